"""run_varlen(): the variable-length forward and backward beside the dense call and a PyTorch
peer, in one process, each result checked before it is timed (as measure.run does).

    cupyflash-varlen  attention_varlen() / attention_varlen_backward() on the packed batch
    cupyflash-dense   attention() / attention_backward() on batch.dense_shape: the same tokens
                      for an equal batch (the very same arrays, reshaped), the mean length for
                      a mixed one (inputs of its own); timed in alternation with
                      cupyflash-varlen (measure.timed_together), so their ratio sees one clock
    torch-varlen      torch.nn.attention.varlen.varlen_attn (FlashAttention-2's varlen kernels),
                      when the installed PyTorch has it (2.9 on); else
    torch-flash-seq   torch SDPA's flash backend called once per sequence (FA2 per sequence)

Checks: the packed rows are cut into runs of equal lengths (varlen.segments), each run viewed
as a dense (sequences, length, H, D) problem and judged by bench.check against the float64
reference of that run, so every sequence is judged on its own, by the dense bench's rule.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from typing import Any, Callable, Sequence


from .. import environment, tolerance, validation
from ..device import require_cupy
from . import check, measure, peers
from .gpu import MIB, first_call, free_device_bytes, free_memory, nbytes, peak_extra_bytes, short
from .grid import PASSES
from .grid import flops as dense_flops
from .varlen import EQUAL_BAR, MIXED_BAR, VarlenBatch, batch_flops, segments
from .varlen_report import summarize

Array = Any  # a cupy.ndarray
Progress = Callable[[str], None]
Segment = tuple[tuple[int, int, int, int], check.Reference]
OURS = ("cupyflash-varlen", "cupyflash-dense")
TORCH_PEERS = ("torch-varlen", "torch-flash-seq")
MAX_MISMATCHES = 5  # failing sequences whose messages a row keeps


# --------------------------------------------------------------------------- the torch peer


def choose_peer(varlen_module: Any) -> str:
    """torch-varlen when the module (torch.nn.attention.varlen, or None) has varlen_attn, else
    torch-flash-seq."""
    return "torch-varlen" if callable(getattr(varlen_module, "varlen_attn", None)) else "torch-flash-seq"


def torch_peer() -> tuple[str | None, str]:
    """The torch peer of this installation and a note saying why: (None, reason) without PyTorch."""
    try:
        if importlib.util.find_spec("torch") is None:
            return None, "PyTorch not installed: no peer"
        torch = peers._import_torch()
    except Exception as exc:  # a broken installation counts as none
        return None, f"no torch peer: {short(exc)}"
    try:
        module = importlib.import_module("torch.nn.attention.varlen")
    except Exception:
        module = None
    peer = choose_peer(module)
    if peer == "torch-varlen":
        return peer, f"torch {torch.__version__}: torch.nn.attention.varlen.varlen_attn"
    return peer, (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn: "
                  "SDPA's flash backend once per sequence")


def varlen_mask_options(varlen_attn: Callable, causal: bool) -> dict[str, Any]:
    """The causal mask in varlen_attn's own words: is_causal= (torch 2.9), else window_size=
    (2.10 on: (-1, 0) is causal)."""
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:
        return {"is_causal": causal}
    return {"window_size": (-1, 0) if causal else (-1, -1)}


_to_torch = peers._to_torch_same_layout


def _from_torch(torch: Any, tensor: Any, dtype: str) -> Array:
    return peers._from_torch_same_layout(torch, tensor.contiguous(), dtype)


def _setup_torch_varlen(torch: Any, pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array) -> peers.Setup:
    varlen_attn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    tensors = tuple(_to_torch(torch, data[n]) for n in ("q", "k", "v", "dout"))
    cu_t = torch.from_dlpack(cu)
    args = (cu_t, cu_t, batch.max_seqlen, batch.max_seqlen)
    mask = varlen_mask_options(varlen_attn, batch.causal)
    return peers._autograd_setup(torch, pass_, lambda q, k, v: varlen_attn(q, k, v, *args, **mask), tensors,
                                 lambda t: _from_torch(torch, t, batch.dtype))


def _setup_torch_per_sequence(torch: Any, pass_: str, batch: VarlenBatch, data: dict[str, Array]) -> peers.Setup:
    """SDPA (flash backend, pinned by impl_context) once per sequence, on (1, H, L, D) views of
    the packed tensors; the backward's leaves are per sequence, so no gradient is scattered."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bounds = [(int(a), int(b)) for a, b in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])]
    packed = {n: _to_torch(torch, data[n]) for n in ("q", "k", "v", "dout")}
    views = {n: [t[a:b].transpose(0, 1).unsqueeze(0) for a, b in bounds] for n, t in packed.items()}

    def repack(tensors: Sequence[Any]) -> Array:  # (1, H, L, D) per sequence -> (tokens, H, D)
        return _from_torch(torch, torch.cat([t[0].transpose(0, 1) for t in tensors]), batch.dtype)

    if pass_ == "fwd":
        def fn() -> Any:
            return [sdpa(q, k, v, is_causal=batch.causal) for q, k, v in zip(views["q"], views["k"], views["v"])]

        return peers.Setup(fn, (repack(fn()),))
    leaves = [tuple(t.detach().requires_grad_(True) for t in qkv) for qkv in zip(views["q"], views["k"], views["v"])]
    outs = [sdpa(q, k, v, is_causal=batch.causal) for q, k, v in leaves]
    flat = [t for leaf in leaves for t in leaf]

    def fn_bwd() -> Any:
        return torch.autograd.grad(outs, flat, views["dout"], retain_graph=True)

    grads = fn_bwd()
    return peers.Setup(fn_bwd, tuple(repack(grads[i::3]) for i in range(3)))


# --------------------------------------------------------------------------- cupyflash varlen


def _setup_cupyflash_varlen(pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array) -> peers.Setup:
    import cupyflash

    q, k, v, dout = (data[n] for n in ("q", "k", "v", "dout"))
    args = (cu, cu, batch.max_seqlen, batch.max_seqlen)
    if pass_ == "fwd":
        def fn() -> Any:
            return cupyflash.attention_varlen(q, k, v, *args, causal=batch.causal)
    else:
        out, lse = cupyflash.attention_varlen(q, k, v, *args, causal=batch.causal, return_lse=True)

        def fn() -> Any:
            return cupyflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, causal=batch.causal)
    first, wall_ms, new_cubins = first_call(fn)
    again, peak = peak_extra_bytes(fn)
    extra = {"first_call_ms": wall_ms, "new_cubins": new_cubins, "peak_extra_mb": peak / MIB,
             "output_mb": nbytes(again) / MIB}
    return peers.Setup(fn, first if isinstance(first, tuple) else (first,), extra)


def setup(impl: str, pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array) -> peers.Setup:
    """impl ready to time `pass_` on the packed q, k, v, dout (tokens, H, D); outputs packed alike.
    The torch peers run inside peers.impl_context("torch-flash")."""
    if impl == "cupyflash-varlen":
        return _setup_cupyflash_varlen(pass_, batch, data, cu)
    torch = peers._import_torch()
    if impl == "torch-varlen":
        return _setup_torch_varlen(torch, pass_, batch, data, cu)
    if impl == "torch-flash-seq":
        return _setup_torch_per_sequence(torch, pass_, batch, data)
    raise ValueError(f"impl {impl!r} is not a packed-batch impl; those are cupyflash-varlen, {', '.join(TORCH_PEERS)}")


# --------------------------------------------------------------------------- the check


def packed_inputs(batch: VarlenBatch, seed: int = 0) -> dict[str, Array]:
    """Signed normal q, k, v, dout (tokens, H, D): for an equal batch the dense call's inputs
    (measure.inputs of batch.dense_shape) reshaped, the same memory; else one (1, tokens, H, D) draw."""
    shape = batch.dense_shape
    if batch.kind == "equal":
        drawn = measure.inputs(shape, seed)
    else:
        dims = (1, batch.tokens, batch.heads, batch.head_dim)
        drawn = validation.random_inputs(dims, dims, batch.dtype, seed=seed, xp=require_cupy())
    return {n: a.reshape(batch.tokens, batch.heads, batch.head_dim) for n, a in drawn.items()}


def _run_view(array: Array, run: tuple[int, int, int, int]) -> Array:
    start, stop, count, length = run
    return array[start:stop].reshape(count, length, *array.shape[1:])


def packed_references(batch: VarlenBatch, data: dict[str, Array], passes: Sequence[str]) -> list[Segment]:
    """check.reference_for of each run of equal lengths, viewed as a dense problem."""
    return [(run, check.reference_for({n: _run_view(a, run) for n, a in data.items()}, batch.causal, batch.dtype,
                                      passes, free_device_bytes(), require_cupy()))
            for run in segments(batch.lengths)]


def _worst(judged: list[tuple[dict[str, Any], tuple[int, int]]]) -> tuple[dict[str, Any], tuple[int, int]]:
    """The (fields, run) whose error is largest; the first NaN one if any."""
    for fields, run in judged:
        if math.isnan(fields["error"]):
            return fields, run
    return max(judged, key=lambda pair: pair[0]["error"])


def run_label(first: int, count: int) -> str:
    """How a message names a run: "sequence 3", or "sequences 0..15 (...)" with what its coordinates count."""
    if count == 1:
        return f"sequence {first}"
    return f"sequences {first}..{first + count - 1} (the coordinate's first index counts from sequence {first})"


def merge_verdicts(verdicts: Sequence[dict[str, Any]], runs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """One row's check fields from check.judge's fields per run (runs: each run's first sequence
    and number of sequences): valid (False if any run fails, None if any was not checked, else
    True), error, errors and allowed of the worst run, worst_sequences ([first, last] of it),
    check ("full" if every run was checked in full, else "slice"), mismatches prefixed with the
    run_label (of the first MAX_MISMATCHES failing runs), failing_runs, and note (the runs' notes)."""
    valids = [v.get("valid") for v in verdicts]
    fields: dict[str, Any] = {"valid": False if False in valids else (None if None in valids or not valids else True)}
    judged = [(v, run) for v, run in zip(verdicts, runs) if v.get("valid") is not None]
    if judged:
        worst, (first, count) = _worst(judged)
        fields.update(error=worst["error"], errors=worst.get("errors"), allowed=worst.get("allowed"),
                      worst_sequences=[first, first + count - 1],
                      check="full" if all(v.get("check") == "full" for v, _ in judged) else "slice")
    failing = [(v, run) for v, run in zip(verdicts, runs) if v.get("mismatches")]
    if failing:
        fields["mismatches"] = [f"{run_label(*run)}: {m}" for v, run in failing[:MAX_MISMATCHES]
                                for m in v["mismatches"]]
        fields["failing_runs"] = len(failing)
    notes = list(dict.fromkeys(v["note"] for v in verdicts if v.get("note")))
    if notes:
        more = f" (and {len(notes) - 1} other notes)" if len(notes) > 1 else ""
        fields["note"] = notes[0] + more
    return fields


def judge_packed(refs: Sequence[Segment], pass_: str, outputs: tuple[Array, ...], dtype: str) -> dict[str, Any]:
    """merge_verdicts of check.judge on each run of the packed outputs (out, or dq, dk, dv)."""
    verdicts, runs, first = [], [], 0
    for run, ref in refs:
        verdicts.append(check.judge(ref, pass_, tuple(_run_view(o, run) for o in outputs), dtype, require_cupy()))
        runs.append((first, run[2]))
        first += run[2]
    return merge_verdicts(verdicts, runs)


# --------------------------------------------------------------------------- rows


def _row(impl: str, pass_: str, batch: VarlenBatch) -> dict[str, Any]:
    dense = batch.dense_shape
    return {"id": batch.id, "kind": batch.kind, "impl": impl, "pass": pass_, "dtype": batch.dtype,
            "head_dim": batch.head_dim, "heads": batch.heads, "causal": batch.causal, "spec": batch.spec,
            "sequences": batch.sequences, "tokens": batch.tokens, "max_seqlen": batch.max_seqlen,
            "dense_batch": dense.batch, "dense_seqlen": dense.seqlen, "bar": batch.bar,
            "flops": batch_flops(batch, pass_), "ms": None, "tflops": None, "valid": None, "error": None}


def _prepare_packed(impl: str, pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array,
                    refs: Sequence[Segment], row: dict[str, Any]) -> Callable[[], Callable[[], Any]]:
    """The prepare() of measure.timed for a packed-batch impl: set up, judge one call's outputs per run."""
    def prepare() -> Callable[[], Any]:
        ready = setup(impl, pass_, batch, data, cu)
        measure._add(row, ready.extra)
        measure._add(row, judge_packed(refs, pass_, ready.outputs, batch.dtype))
        return ready.fn

    return prepare


def _rate(row: dict[str, Any]) -> Callable[[float], float]:
    return lambda ms: row["flops"] / (ms * 1e-3) / 1e12


def measure_packed(impl: str, pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array,
                   refs: Sequence[Segment], runs: int, warmup: int) -> dict[str, Any]:
    """One row of a packed-batch impl, timed on its own (the torch peer)."""
    row = _row(impl, pass_, batch)
    context = "torch-flash" if impl in TORCH_PEERS else impl
    return measure.timed(row, context, _prepare_packed(impl, pass_, batch, data, cu, refs, row), runs, warmup,
                         _rate(row))


def measure_ours(pass_: str, batch: VarlenBatch, data: dict[str, Array], cu: Array, refs: Sequence[Segment],
                 dense_data: dict[str, Array], dense_ref: check.Reference, runs: int,
                 warmup: int) -> list[dict[str, Any]]:
    """The cupyflash-varlen and cupyflash-dense rows of one pass, each checked, then timed in
    alternation (measure.timed_together): their ratio is the bar, and timed minutes apart it
    moved by up to 7% with the GPU's clock (benchmarks/results/h200-2026-12-03-sharded-suite).
    The dense row's FLOPs are those of batch.dense_shape."""
    shape = batch.dense_shape
    varlen, dense = _row("cupyflash-varlen", pass_, batch), _row("cupyflash-dense", pass_, batch)
    dense["flops"] = dense_flops(shape, pass_)

    def prepare_dense() -> Callable[[], Any]:
        ready = peers.setup("cupyflash", pass_, shape, dense_data)
        measure._add(dense, ready.extra)
        measure._add(dense, check.judge(dense_ref, pass_, ready.outputs, shape.dtype, require_cupy()))
        return ready.fn

    prepares = [_prepare_packed("cupyflash-varlen", pass_, batch, data, cu, refs, varlen), prepare_dense]
    return measure.timed_together([varlen, dense], prepares, runs, warmup, [_rate(varlen), _rate(dense)])


def describe(row: dict[str, Any]) -> str:
    """One progress line for a finished row."""
    return measure.describe_outcome(f"{row['id']} {row['impl']} {row['pass']}: ", row)


def _batch_rows(batch: VarlenBatch, passes: Sequence[str], peer: str | None, runs: int, warmup: int):
    """Every row of one batch, as they finish: per pass ours (varlen and dense, together), then the peer."""
    data = packed_inputs(batch)
    refs = packed_references(batch, data, passes)
    cu = require_cupy().asarray(batch.cu_seqlens)
    shape = batch.dense_shape
    if batch.kind == "equal":  # the same arrays and the same reference: one run, the dense shape
        dense_data, dense_ref = {n: a.reshape(shape.dims) for n, a in data.items()}, refs[0][1]
    else:  # the mean length: inputs and a reference of its own
        dense_data = measure.inputs(shape)
        dense_ref = check.reference_for(dense_data, shape.causal, shape.dtype, passes, free_device_bytes(),
                                        require_cupy())
    for pass_ in passes:
        yield from measure_ours(pass_, batch, data, cu, refs, dense_data, dense_ref, runs, warmup)
        free_memory()
        if peer:
            yield measure_packed(peer, pass_, batch, data, cu, refs, runs, warmup)
            free_memory()


def _settings(passes: Sequence[str], runs: int, warmup: int, peer: str | None, peer_note: str) -> dict[str, Any]:
    return {"runs": runs, "warmup": warmup, "passes": list(passes), "peer": peer, "peer_note": peer_note,
            "bars": {"equal": EQUAL_BAR, "mixed": MIXED_BAR},
            "flops": "real tokens only: per sequence 4*L^2*D*H forward, halved when causal; backward 2.5x",
            "tolerance": {"rule": measure.RULE, "floor_eps": dict(tolerance.FLOOR_EPS)},
            "check": "per run of equal lengths, each a dense problem, by bench.check",
            "check_rows": check.CHECK_ROWS, "reference_memory_fraction": check.REFERENCE_MEMORY_FRACTION}


def run_varlen(batches: Sequence[VarlenBatch], *, passes: Sequence[str] = PASSES, runs: int = 20, warmup: int = 3,
               progress: Progress | None = None) -> dict[str, Any]:
    """Validate, then time every (batch, pass, impl) on the current GPU; returns the report.

    Report: {"kind": "varlen", "environment": environment.record(), "rows": [...], "summary":
    [...] (varlen_report.summarize: the varlen / dense ratio per batch and pass, against the
    bar), "settings": {...}}. A row: id, kind, impl (cupyflash-varlen, cupyflash-dense,
    torch-varlen or torch-flash-seq), pass, dtype, head_dim, heads, causal, spec, sequences,
    tokens, max_seqlen, dense_batch, dense_seqlen, bar, flops (real tokens; the dense shape's
    for cupyflash-dense), ms, tflops, valid, error, and measure.run's other fields where they
    apply (worst_sequences, failing_runs for packed impls).
    """
    measure._check_run_args(passes, (), runs, warmup)
    say = progress or (lambda message: None)
    peer, peer_note = torch_peer()
    report: dict[str, Any] = {"kind": "varlen", "environment": environment.record(), "rows": [],
                              "settings": _settings(passes, runs, warmup, peer, peer_note)}
    per_batch = len(passes) * (3 if peer else 2)
    for n, batch in enumerate(batches):
        for m, row in enumerate(_batch_rows(batch, passes, peer, runs, warmup)):
            report["rows"].append(row)
            say(f"[{n * per_batch + m + 1}/{len(batches) * per_batch}] {describe(row)}")
        free_memory()
    report["summary"] = summarize(report["rows"])
    return report
