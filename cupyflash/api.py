"""The public functions. A call validates the inputs, picks a config and launches the kernels,
through a launch plan (plan.py) that a repeat call with the same array layouts runs directly.

Causal masking with seqlen_q != seqlen_k is aligned to the bottom-right corner, as in
flash_attn: query i sees key j when j <= i + seqlen_k - seqlen_q. For seqlen_q = 3,
seqlen_k = 5 (x = visible)::

           key 0 1 2 3 4
    query 0    x x x . .
    query 1    x x x x .
    query 2    x x x x x
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from . import plan as plans
from . import merge, varlen
from .arrays import Placement, check_given, kernel_ready, to_caller, to_gpu, unpadded, wrap_all
from .device import INSTALL_HINT, cupy_module, current_device_id, gpu_count, require_cupy, require_supported_gpu
from .problem import Problem, check_flag, check_seed

BACKWARD_INPUTS = ("dout", "q", "k", "v", "out", "lse")


def attention(q: Any, k: Any, v: Any, *, causal: bool = False, softmax_scale: float | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Any = None,
              dropout_p: float = 0.0, seed: int | None = None, return_lse: bool = False) -> Any:
    """Exact softmax attention, fused: ``softmax(softmax_scale * q @ k^T) @ v`` per head.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim) with
    heads_q a multiple of heads_kv (MQA/GQA); float16 or bfloat16; only the last dimension must
    be contiguous. CuPy arrays, NumPy arrays (results come back as NumPy) or any DLPack /
    __cuda_array_interface__ object. softmax_scale defaults to 1 / sqrt(head_dim).
    causal: bottom-right aligned (see the module docstring). window_size (left, right): query i
    sees keys [i + off - left, i + off + right], off = seqlen_k - seqlen_q, -1 = unbounded.

    Returns out (batch, seqlen_q, heads_q, head_dim) in the input dtype, and with return_lse
    also lse (batch, heads_q, seqlen_q) float32, the natural log of each row's softmax
    denominator. A row that sees no key (seqlen_k = 0 included) gets out = 0 and lse = -inf, the
    log of an empty sum (so results over disjoint keys merge by lse without NaN).

    Every argument is checked before a GPU is looked for: a bad one raises TypeError or
    ValueError naming it, on any machine.
    """
    # Flags first, as bools: the plan key below holds them as given, and 1 == True there.
    if causal.__class__ is not bool or return_lse.__class__ is not bool:
        causal, return_lse = check_flag("causal", causal), check_flag("return_lse", return_lse)
    # A repeat of an earlier call (same array layouts, options and device) reuses its checks,
    # config, kernels and parameter block: plan.py.
    options = (causal, softmax_scale, window_size)
    plan = plans.find("fwd", (q, k, v), options, (softcap, alibi_slopes, dropout_p, seed))
    if plan is not None:
        out, lse = plan.run({"q": q, "k": k, "v": v})
        return (out, lse) if return_lse else out
    given = {"q": q, "k": k, "v": v}
    check_given("attention", **given)
    arrays, placement = wrap_all(**given, alibi_slopes=alibi_slopes)
    problem = Problem.from_arrays(arrays["q"], arrays["k"], arrays["v"], causal=causal,
                                  softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                  alibi_slopes=arrays.get("alibi_slopes"), dropout_p=dropout_p, sources=given)
    check_seed(seed)
    _require_kernel_features(problem)
    with _device_of(placement) as device_id:
        t = {name: kernel_ready(arrays[name]) for name in ("q", "k", "v")}
        plan = plans.build_forward(problem, t, device_id)
        out, lse = plan.launch(t)
        plans.keep(plan, problem, "fwd", (q, k, v), options, (t["q"], t["k"], t["v"]), device_id)
        out = unpadded(out, problem.head_dim)
    out = to_caller(out, placement)
    return (out, to_caller(lse, placement)) if return_lse else out


def attention_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, causal: bool = False,
                       softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                       softcap: float = 0.0, alibi_slopes: Any = None, dropout_p: float = 0.0,
                       seed: int | None = None, deterministic: bool = False) -> tuple[Any, Any, Any]:
    """Gradients (dq, dk, dv) of ``attention`` given dout = dLoss/dout, out and lse from the
    forward call with the same options. Shapes and dtypes as q, k, v; with GQA, dk and dv are
    summed over the q heads that share each kv head. deterministic=True gives bitwise-repeatable
    results (dQ in its own pass instead of float32 atomics, about 1.4x the matrix work). A row
    whose lse is -inf (or +inf, the convention before 2026-12) sees no key: no gradient flows from it.
    """
    if causal.__class__ is not bool or deterministic.__class__ is not bool:  # as in attention()
        causal, deterministic = check_flag("causal", causal), check_flag("deterministic", deterministic)
    inputs = (dout, q, k, v, out, lse)
    options = (causal, softmax_scale, window_size, deterministic)
    plan = plans.find("bwd", inputs, options, (softcap, alibi_slopes, dropout_p, seed))
    if plan is not None:
        return plan.run(dict(zip(BACKWARD_INPUTS, inputs)))
    given = dict(zip(BACKWARD_INPUTS, inputs))
    check_given("attention_backward", **given)
    arrays, placement = wrap_all(**given, alibi_slopes=alibi_slopes)
    problem = Problem.from_arrays(arrays["q"], arrays["k"], arrays["v"], causal=causal,
                                  softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                  alibi_slopes=arrays.get("alibi_slopes"), dropout_p=dropout_p, sources=given)
    problem.check_backward(arrays["dout"], arrays["out"], arrays["lse"], sources=given)
    check_seed(seed)
    _require_kernel_features(problem)
    with _device_of(placement) as device_id:
        t = {name: kernel_ready(arrays[name]) for name in ("dout", "q", "k", "v", "out")}
        t["lse"] = require_cupy().ascontiguousarray(to_gpu(arrays["lse"]))
        plan = plans.build_backward(problem, t, deterministic, device_id)
        grads = plan.launch(t)
        plans.keep(plan, problem, "bwd", inputs, options, tuple(t[name] for name in BACKWARD_INPUTS), device_id)
    return tuple(to_caller(unpadded(g, problem.head_dim), placement) for g in grads)


def attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, softmax_scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), seqused_k: Any = None, softcap: float = 0.0,
                     alibi_slopes: Any = None, dropout_p: float = 0.0, seed: int | None = None,
                     return_lse: bool = False, check: bool = False) -> Any:
    """``attention`` over a packed batch of sequences of different lengths, in one launch per kernel.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim); cu_seqlens_q and
    cu_seqlens_k: int32 (batch + 1,) on the same device, sequence b owning query rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] and keys from cu_seqlens_k[b] to cu_seqlens_k[b + 1]
    (or seqused_k[b] of them: int32 (batch,)). max_seqlen_q / max_seqlen_k: Python ints, at least
    every sequence's length. Each sequence gets exactly what attention() gives it alone: causal
    and windows are per sequence, bottom-right aligned; a zero-length sequence produces nothing.

    Returns out (total_q, heads_q, head_dim), and with return_lse also lse (heads_q, total_q) float32.

    The offsets' values are not read on the host, so a call needs no device sync and can be
    captured in a CUDA graph; offsets that break the rules give wrong results (never an access
    outside the arrays). check=True copies them to the host and checks the rules first (a sync):
    cu_seqlens_*[0] == 0, non-decreasing, cu_seqlens_q[-1] == total_q, cu_seqlens_k[-1] <= total_k,
    0 <= seqused_k[b] <= its slot, every length <= its max_seqlen. See cupyflash/varlen.py.
    """
    causal, return_lse, check = (check_flag(name, value) for name, value in
                                 (("causal", causal), ("return_lse", return_lse), ("check", check)))
    offsets = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "seqused_k": seqused_k}
    inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    options = ("varlen", causal, softmax_scale, window_size, max_seqlen_q, max_seqlen_k, seqused_k is None)
    plan = None if check else plans.find("fwd", _given(inputs), options, (softcap, alibi_slopes, dropout_p, seed))
    if plan is not None:
        out, lse = plan.run({"q": q[None], "k": k[None], "v": v[None], **offsets})
        return (out[0], lse) if return_lse else out[0]
    given = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    arrays, placement, problem = _packed_problem(
        "attention_varlen", given, seqused_k, alibi_slopes, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, dropout_p=dropout_p)
    _packed_last_checks(problem, arrays, seed, check, max_seqlen_q, max_seqlen_k)
    with _device_of(placement) as device_id:
        t = {name: kernel_ready(arrays[name][None]) for name in ("q", "k", "v")}
        t.update(_device_offsets(arrays))
        plan = plans.build_forward(problem, t, device_id)
        out, lse = plan.launch(t)
        ready = (t["q"], t["k"], t["v"], t["cu_seqlens_q"], t["cu_seqlens_k"], t.get("seqused_k"))
        plans.keep(plan, problem, "fwd", _given(inputs), options, _given(ready), device_id)
        out = unpadded(out, problem.head_dim)[0]
    out = to_caller(out, placement)
    return (out, to_caller(lse, placement)) if return_lse else out


def attention_varlen_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, cu_seqlens_q: Any,
                              cu_seqlens_k: Any, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                              softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                              seqused_k: Any = None, softcap: float = 0.0, alibi_slopes: Any = None,
                              dropout_p: float = 0.0, seed: int | None = None, deterministic: bool = False,
                              check: bool = False) -> tuple[Any, Any, Any]:
    """Gradients (dq, dk, dv) of ``attention_varlen``, shaped like q, k, v, given dout, and out and
    lse from the forward call with the same arguments. dk and dv rows of keys no sequence uses
    are 0. deterministic and check as in attention_backward and attention_varlen."""
    causal, deterministic, check = (check_flag(name, value) for name, value in
                                    (("causal", causal), ("deterministic", deterministic), ("check", check)))
    offsets = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "seqused_k": seqused_k}
    inputs = (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k)
    options = ("varlen", causal, softmax_scale, window_size, max_seqlen_q, max_seqlen_k, seqused_k is None,
               deterministic)
    plan = None if check else plans.find("bwd", _given(inputs), options, (softcap, alibi_slopes, dropout_p, seed))
    if plan is not None:
        views = {name: x[None] for name, x in zip(("dout", "q", "k", "v", "out"), inputs)}
        return tuple(g[0] for g in plan.run({**views, "lse": lse, **offsets}))
    given = {**dict(zip(BACKWARD_INPUTS, inputs)), "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    arrays, placement, problem = _packed_problem(
        "attention_varlen_backward", given, seqused_k, alibi_slopes, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, dropout_p=dropout_p)
    varlen.check_backward(problem, arrays["dout"], arrays["out"], arrays["lse"], sources=given)
    _packed_last_checks(problem, arrays, seed, check, max_seqlen_q, max_seqlen_k)
    with _device_of(placement) as device_id:
        t = {name: kernel_ready(arrays[name][None]) for name in ("dout", "q", "k", "v", "out")}
        t["lse"] = require_cupy().ascontiguousarray(to_gpu(arrays["lse"]))
        t.update(_device_offsets(arrays))
        plan = plans.build_backward(problem, t, deterministic, device_id)
        grads = plan.launch(t)
        ready = (*(t[name] for name in BACKWARD_INPUTS), t["cu_seqlens_q"], t["cu_seqlens_k"], t.get("seqused_k"))
        plans.keep(plan, problem, "bwd", _given(inputs), options, _given(ready), device_id)
    return tuple(to_caller(unpadded(g, problem.head_dim)[0], placement) for g in grads)


def merge_attention(outs: Any, lses: Any) -> tuple[Any, Any]:
    """Attention results for the same queries over disjoint sets of keys, merged into the result
    over their union: exact (float32 on the GPU), any number of parts, in one kernel.

    outs: a list or tuple of (batch, seqlen_q, heads_q, head_dim) arrays of one shape and dtype
    (float16 or bfloat16, head_dim contiguous); lses: the matching float32 (batch, heads_q,
    seqlen_q), as attention(..., return_lse=True) returns them. Returns (out, lse) in the same
    layouts: out in the parts' dtype, lse float32. A part whose lse is -inf for a row saw no key
    there and weighs 0 (+inf, flash_attn 2's mark, counts as -inf too); a row no part saw gets
    out = 0 and lse = -inf; a NaN lse makes its row NaN. Uses: split-KV decoding, a shared prompt
    prefix attended once (cascade), chunked prefill, ring attention.
    """
    outs, lses, placement = merge.checked_inputs(outs, lses)
    with _device_of(placement) as device_id:
        out, lse = merge.launch_merge(outs, lses, device_id)
    return to_caller(out, placement), to_caller(lse, placement)


def _packed_problem(function: str, given: dict[str, Any], seqused_k: Any, alibi_slopes: Any, max_seqlen_q: Any,
                    max_seqlen_k: Any, **options: Any) -> tuple[dict[str, Any], Placement, Problem]:
    """The full path's first checks of a packed call: the required arrays given, all in one
    place, and the Problem (varlen.problem_of: shapes, dtypes, offsets' form, options)."""
    check_given(function, **given)
    arrays, placement = wrap_all(**given, seqused_k=seqused_k, alibi_slopes=alibi_slopes)
    problem = varlen.problem_of(arrays["q"], arrays["k"], arrays["v"], arrays, max_seqlen_q, max_seqlen_k,
                                alibi_slopes=arrays.get("alibi_slopes"), sources=given, **options)
    return arrays, placement, problem


def _packed_last_checks(problem: Problem, arrays: dict[str, Any], seed: Any, check: bool, max_seqlen_q: int,
                        max_seqlen_k: int) -> None:
    """The seed, the features the kernels lack, and with check=True the offsets' values (a sync)."""
    check_seed(seed)
    _require_kernel_features(problem)
    if check:
        varlen.check_values(problem, arrays, max_seqlen_q, max_seqlen_k)


def _given(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arrays of a call without its optional ones left out (None), for plan keys."""
    return tuple(a for a in arrays if a is not None)


def _device_offsets(arrays: dict[str, Any]) -> dict[str, Any]:
    """cu_seqlens_q, cu_seqlens_k and seqused_k (when given) as contiguous int32 on the GPU."""
    cupy = require_cupy()
    return {name: cupy.ascontiguousarray(to_gpu(arrays[name])) for name in varlen.OFFSET_NAMES
            if arrays.get(name) is not None}


def _require_kernel_features(problem: Problem) -> None:
    """Options the API accepts and the reference implements, but the GPU kernels do not yet."""
    missing = [name for name, used in (("softcap", problem.softcap > 0), ("alibi_slopes", problem.has_alibi),
                                       ("dropout_p", problem.dropout_p > 0)) if used]
    if missing:
        raise NotImplementedError(f"{', '.join(missing)} not yet supported by the GPU kernels; "
                                  "cupyflash.reference implements them on the CPU")


@contextmanager
def _device_of(placement: Placement) -> Iterator[int]:
    """Run on the inputs' GPU (the current one for NumPy inputs); plans launch on its current stream.
    A GPU the kernels cannot run on is refused here, before anything is compiled for it."""
    if gpu_count() == 0:
        hint = "" if cupy_module() is not None else f" (CuPy is not installed: {INSTALL_HINT})"
        raise RuntimeError(f"cupyflash found no CUDA GPU{hint}; cupyflash.reference computes attention on the CPU")
    cupy = require_cupy()
    device_id = current_device_id() if placement.on_host else placement.device_id
    require_supported_gpu(device_id)
    with cupy.cuda.Device(device_id):
        yield device_id
