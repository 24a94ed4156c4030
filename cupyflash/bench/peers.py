"""The implementations being timed ("impls") and how each is made ready to time.

    cupyflash        attention() / attention_backward() (out, lse made once, outside the timing)
    cupyflash-det    attention_backward(deterministic=True)                       (bwd only)
    naive-cupy       dense attention in CuPy in the input dtype (S and P in device memory;
                     bfloat16 runs in float32; at most NAIVE_MAX_RUNS timed runs). A peer for
                     scale only: results are judged by bench.check, never against it.
    torch-flash      torch SDPA, FlashAttention-2 backend          } only when PyTorch imports;
    torch-cudnn      torch SDPA, cuDNN backend                      } PyTorch is a peer here,
    torch-efficient  torch SDPA, memory-efficient (xformers) backend} never a dependency
    flash-attn-4     FlashAttention-4 (the flash-attn-4 wheel's flash_attn.cute, CuTe DSL, Hopper
                     and Blackwell), only where it and PyTorch import: an optional peer, never a
                     dependency. Its first call per shape compiles (seconds), outside the timing.

setup() returns the call to time and the outputs of one call, in the (B, S, H, D) layout, for
the check; impl_context() wraps both (the torch backend pinned, the streams shared).
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .. import reference
from ..device import require_cupy
from ..problem import numpy_dtype
from .gpu import MIB, first_call, nbytes, peak_extra_bytes, short
from .grid import IMPLS, BenchShape

Array = Any  # a numpy.ndarray or a cupy.ndarray

TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                  "torch-efficient": "EFFICIENT_ATTENTION"}
FA4 = "flash-attn-4"
FA4_MODULE = "flash_attn.cute"  # the flash-attn-4 wheel's package (flash_attn is a namespace package there)
NAIVE_MEMORY_FRACTION = 0.4  # naive-cupy runs when its float32 (B, H, S, S) scores fit in this share
# naive-cupy is 10-100x slower than the fused kernels and only there for scale: a few runs suffice.
NAIVE_MAX_RUNS, NAIVE_MAX_WARMUP = 5, 1
NAIVE_BF16_NOTE = "bfloat16 computed in float32: CuPy 14's batched matmul has no bfloat16"
GB = 1e9


@dataclass
class Setup:
    """An implementation ready to time: the timed call, the outputs of one call in the
    (B, S, H, D) layout (out, or dq, dk, dv) for the check, and fields for the row."""

    fn: Callable[[], Any]
    outputs: tuple[Array, ...]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- naive-cupy


def to_float32(array: Array) -> Array:
    """float16 / bfloat16 / float32 values as float32 (bfloat16 through its bits, so the array
    module needs no bfloat16 arithmetic)."""
    if array.dtype.name == "bfloat16":
        return (array.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return array.astype(np.float32)


def naive_score_bytes(shape: BenchShape) -> int:
    """Bytes of the float32 (B, H, S, S) score matrix naive-cupy materializes."""
    return shape.batch * shape.heads * shape.seqlen * shape.seqlen * 4


def naive_skip_reason(shape: BenchShape, free_bytes: int) -> str | None:
    """Why naive-cupy is skipped for this shape given `free_bytes` of device memory, or None."""
    need = naive_score_bytes(shape)
    if need <= NAIVE_MEMORY_FRACTION * free_bytes:
        return None
    return (f"skipped: would need {need / GB:.1f} GB for the float32 (B, H, S, S) scores "
            f"(allowed: {NAIVE_MEMORY_FRACTION:.0%} of {free_bytes / GB:.1f} GB free)")


def _causal_bias(seqlen: int, xp: Any) -> Array:
    """(S, S) float32: 0 where key j <= query i, -inf above the diagonal (seqlen_q == seqlen_k)."""
    rows, cols = xp.arange(seqlen)[:, None], xp.arange(seqlen)[None, :]
    return xp.where(cols > rows, np.float32(-np.inf), np.float32(0)).astype(np.float32, copy=False)


def _naive_operands(*arrays: Array) -> tuple[Array, ...]:
    """Arrays in the dtype naive attention computes in: their own, except bfloat16, which runs
    in float32 (exact for bfloat16 values) since CuPy's batched matmul rejects bfloat16."""
    return tuple(to_float32(a) if a.dtype.name == "bfloat16" else a for a in arrays)


def naive_forward(q: Array, k: Array, v: Array, causal: bool, xp: Any) -> tuple[Array, Array]:
    """Dense attention in the input dtype: P (B, H, S, S) and out (B, H, S, D) in the compute dtype
    (float16 for float16 inputs; float32 for bfloat16 ones, see _naive_operands).

    q, k, v: (B, S, H, D), seqlen_q == seqlen_k. Scores come out of xp.matmul in the compute
    dtype, the softmax runs in float32 in place, and P is rounded back to the compute dtype for
    the P·V matmul. Peak memory: 1.5 × the float32 score matrix (1 × for bfloat16).
    """
    q, k, v = _naive_operands(q, k, v)
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = xp.matmul(qh, kh.transpose(0, 1, 3, 2))
    probs = scores.astype(np.float32, copy=False)
    del scores
    probs *= np.float32(reference.default_softmax_scale(q.shape[3]))
    if causal:
        probs += _causal_bias(q.shape[1], xp)
    probs -= probs.max(axis=-1, keepdims=True)
    xp.exp(probs, out=probs)
    probs /= probs.sum(axis=-1, keepdims=True)
    p = probs.astype(q.dtype, copy=False)
    del probs
    return p, xp.matmul(p, vh)


def naive_backward(dout: Array, q: Array, k: Array, v: Array, p: Array, out: Array,
                   xp: Any) -> tuple[Array, Array, Array]:
    """Analytic gradients of naive_forward: dq, dk, dv (B, H, S, D) in its compute dtype.

    dout, q, k, v: (B, S, H, D); p, out: naive_forward's results. dV = Pᵀ·dO, dP = dO·Vᵀ,
    δ = rowsum(dO ∘ O) in float32, dS = P ∘ (dP − δ) with dP − δ rounded to the compute dtype
    (computed in place in dP's buffer), dQ = dS·K·scale, dK = dSᵀ·Q·scale.
    """
    qh, kh, vh, doh = (t.transpose(0, 2, 1, 3) for t in _naive_operands(q, k, v, dout))
    scale = reference.default_softmax_scale(q.shape[3])
    dv = xp.matmul(p.transpose(0, 1, 3, 2), doh)
    ds = xp.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds -= (to_float32(doh) * to_float32(out)).sum(axis=-1, keepdims=True)
    ds *= p
    dq = xp.matmul(ds, kh)
    dk = xp.matmul(ds.transpose(0, 1, 3, 2), qh)
    dq *= scale
    dk *= scale
    return dq, dk, dv


def _setup_naive(pass_: str, shape: BenchShape, data: dict[str, Array]) -> Setup:
    cupy = require_cupy()
    q, k, v, dout = (data[n] for n in ("q", "k", "v", "dout"))
    extra = {"note": NAIVE_BF16_NOTE} if shape.dtype == "bfloat16" else {}
    if pass_ == "fwd":
        def fn() -> Any:
            return naive_forward(q, k, v, shape.causal, cupy)[1]
    else:
        p, out = naive_forward(q, k, v, shape.causal, cupy)  # saved state, as autograd would keep it

        def fn() -> Any:
            return naive_backward(dout, q, k, v, p, out, cupy)
    result, peak = peak_extra_bytes(fn)
    extra.update(peak_extra_mb=peak / MIB, output_mb=nbytes(result) / MIB)
    outputs = result if isinstance(result, tuple) else (result,)
    return Setup(fn, tuple(o.transpose(0, 2, 1, 3) for o in outputs), extra)


# --------------------------------------------------------------------------- cupyflash


def _setup_cupyflash(pass_: str, shape: BenchShape, data: dict[str, Array], deterministic: bool) -> Setup:
    import cupyflash

    q, k, v, dout = (data[n] for n in ("q", "k", "v", "dout"))
    if pass_ == "fwd":
        def fn() -> Any:
            return cupyflash.attention(q, k, v, causal=shape.causal)
    else:
        out, lse = cupyflash.attention(q, k, v, causal=shape.causal, return_lse=True)

        def fn() -> Any:
            return cupyflash.attention_backward(dout, q, k, v, out, lse, causal=shape.causal,
                                                deterministic=deterministic)
    first, wall_ms, new_cubins = first_call(fn)
    again, peak = peak_extra_bytes(fn)
    extra = {"first_call_ms": wall_ms, "new_cubins": new_cubins, "peak_extra_mb": peak / MIB,
             "output_mb": nbytes(again) / MIB}
    return Setup(fn, first if isinstance(first, tuple) else (first,), extra)


# --------------------------------------------------------------------------- torch SDPA


def _import_torch() -> Any:
    try:
        import torch
    except Exception as exc:
        raise RuntimeError(f"PyTorch does not import ({short(exc)}); the torch-* peers need it") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no CUDA device")
    return torch


def _to_torch_same_layout(torch: Any, array: Array) -> Any:
    """A CuPy array as a torch view of the same memory and layout (through int16 bits, so DLPack
    never has to carry bfloat16)."""
    return torch.from_dlpack(array.view(np.int16)).view(getattr(torch, array.dtype.name))


def _from_torch_same_layout(torch: Any, tensor: Any, dtype: str) -> Array:
    cupy = require_cupy()
    return cupy.from_dlpack(tensor.detach().view(torch.int16)).view(numpy_dtype(dtype))


def _to_torch(torch: Any, array: Array, contiguous: bool) -> Any:
    """A (B, S, H, D) CuPy array as a (B, H, S, D) torch view of the same memory, or a
    contiguous copy."""
    tensor = _to_torch_same_layout(torch, array).transpose(1, 2)
    return tensor.contiguous() if contiguous else tensor


def _from_torch(torch: Any, tensor: Any, dtype: str) -> Array:
    """A (B, H, S, D) torch tensor as a (B, S, H, D) CuPy view of the same memory."""
    return _from_torch_same_layout(torch, tensor, dtype).transpose(0, 2, 1, 3)


def _autograd_setup(torch: Any, pass_: str, attend: Callable[..., Any], tensors: tuple[Any, ...],
                    to_cupy: Callable[[Any], Array], extra: dict[str, Any] | None = None) -> Setup:
    """A torch peer ready to time: attend(q, k, v) -> out forward; backward, torch autograd of
    out against dout from one recorded forward. tensors: q, k, v, dout in the peer's layout;
    to_cupy turns one of its results into a (B, S, H, D) CuPy array for the check."""
    q, k, v, dout = tensors
    if pass_ == "fwd":
        def fn() -> Any:
            return attend(q, k, v)

        return Setup(fn, (to_cupy(fn()),), extra or {})
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attend(qg, kg, vg)

    def fn_bwd() -> Any:
        return torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    return Setup(fn_bwd, tuple(to_cupy(g) for g in fn_bwd()), extra or {})


def _torch_attempt(torch: Any, pass_: str, shape: BenchShape, data: dict[str, Array], contiguous: bool) -> Setup:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tensors = tuple(_to_torch(torch, data[n], contiguous) for n in ("q", "k", "v", "dout"))
    note = {"note": "contiguous (B, H, S, D) copies: the strided views were rejected"} if contiguous else {}
    return _autograd_setup(torch, pass_, lambda q, k, v: sdpa(q, k, v, is_causal=shape.causal), tensors,
                           lambda t: _from_torch(torch, t, shape.dtype), note)


def _setup_torch(pass_: str, shape: BenchShape, data: dict[str, Array]) -> Setup:
    """torch SDPA on (B, H, S, D) views of our arrays; contiguous copies (made here, outside
    the timing) only if the backend rejects the views. Runs inside impl_context."""
    torch = _import_torch()
    try:
        return _torch_attempt(torch, pass_, shape, data, contiguous=False)
    except RuntimeError as exc:
        first = exc
    try:
        return _torch_attempt(torch, pass_, shape, data, contiguous=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{short(exc)} (strided views: {short(first)})") from exc


def _cupy_stream_of(torch: Any) -> Any:
    """CuPy's handle on torch's current stream, so CUDA events recorded by do_bench bracket
    the torch work (torch's default stream is CuPy's null stream: both are the legacy stream 0)."""
    cupy = require_cupy()
    torch_stream = torch.cuda.current_stream()
    if not torch_stream.cuda_stream:
        return cupy.cuda.Stream.null
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(torch_stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ExternalStream, deprecated in CuPy 14
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device.index or 0)


# --------------------------------------------------------------------------- FlashAttention-4


def _import_fa4() -> Any:
    """flash_attn.cute.flash_attn_func, or a RuntimeError saying why not."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:
        raise RuntimeError(f"{FA4_MODULE} does not import ({short(exc)}); install the flash-attn-4 wheel "
                           "and its CuTe DSL wheels to time it") from exc
    return flash_attn_func


def _setup_fa4(pass_: str, shape: BenchShape, data: dict[str, Array]) -> Setup:
    """FlashAttention-4 on (B, S, H, D) torch views of our arrays, its own layout. Runs inside
    impl_context (CuPy's stream = torch's)."""
    torch = _import_torch()
    flash_attn_func = _import_fa4()
    tensors = tuple(_to_torch_same_layout(torch, data[n]) for n in ("q", "k", "v", "dout"))
    return _autograd_setup(torch, pass_, lambda q, k, v: flash_attn_func(q, k, v, causal=shape.causal)[0],  # (out, lse)
                           tensors, lambda t: _from_torch_same_layout(torch, t, shape.dtype))


# --------------------------------------------------------------------------- every impl


def setup(impl: str, pass_: str, shape: BenchShape, data: dict[str, Array]) -> Setup:
    """impl ready to time `pass_` on data's q, k, v, dout (B, S, H, D); inside impl_context(impl)."""
    if impl in ("cupyflash", "cupyflash-det"):
        return _setup_cupyflash(pass_, shape, data, deterministic=impl == "cupyflash-det")
    if impl == "naive-cupy":
        return _setup_naive(pass_, shape, data)
    if impl == FA4:
        return _setup_fa4(pass_, shape, data)
    return _setup_torch(pass_, shape, data)


@contextmanager
def impl_context(impl: str) -> Iterator[list]:
    """For torch-*: the SDPA backend pinned, CuPy's current stream = torch's, and torch's
    warnings (the reasons a backend declines a shape) collected. For flash-attn-4: CuPy's
    current stream = torch's. Yields the warnings list (empty for the others)."""
    if impl == FA4:
        with _cupy_stream_of(_import_torch()):
            yield []
        return
    if impl not in TORCH_BACKENDS:
        yield []
        return
    torch = _import_torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, TORCH_BACKENDS[impl])
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend), _cupy_stream_of(torch):
        warnings.simplefilter("always")
        yield caught


def _installed(module: str) -> bool:
    """Whether `module` can be found (a broken installation counts as none)."""
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:
        return False


def available_impls() -> tuple[str, ...]:
    """The default implementations: all of IMPLS, less the torch-* peers when PyTorch is absent
    and flash-attn-4 unless both PyTorch and flash_attn.cute are installed."""
    has_torch = _installed("torch")
    has_fa4 = has_torch and _installed(FA4_MODULE)
    return tuple(i for i in IMPLS if (i not in TORCH_BACKENDS or has_torch) and (i != FA4 or has_fa4))
