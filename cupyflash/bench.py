"""Speed of cupyflash beside its peers, measured in one process on one GPU.

    from cupyflash import bench
    report = bench.run(bench.paper_grid(), progress=print)
    bench.save(report, "benchmarks/results", bench.default_stem(report))
    print(bench.format_table(report, "fwd"))

Implementations ("impls"), all fed the same random signed-normal q, k, v, dout of shape
(batch, seqlen, heads, head_dim):

    cupyflash        attention() / attention_backward() (out, lse made once, outside the timing)
    cupyflash-det    attention_backward(deterministic=True)                       (bwd only)
    naive-cupy       dense attention in CuPy in the input dtype (S and P in device memory;
                     bfloat16 runs in float32; at most NAIVE_MAX_RUNS timed runs)
    torch-flash      torch SDPA, FlashAttention-2 backend          } only when PyTorch imports;
    torch-cudnn      torch SDPA, cuDNN backend                      } PyTorch is a peer here,
    torch-efficient  torch SDPA, memory-efficient (xformers) backend} never a dependency

Every result is checked before it is timed: against naive-cupy's result, or, when naive-cupy
would not fit in memory, against a float32 recomputation of the last 64 query rows of batch
element 0. A result that fails the check is still timed but flagged (valid: false, "✗").

FLOPs follow the FlashAttention papers: fwd = 4·B·H·S²·D, halved when causal; bwd = 2.5 × fwd.
Times are cupyflash.timing.do_bench medians in milliseconds (CUDA events, L2 flushed).
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import math
import platform
import re
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import __version__, build, reference, settings
from .device import cupy_module, current_device_id, device_limits, gpu_count, require_cupy
from .problem import numpy_dtype
from .timing import do_bench

DTYPES = ("float16", "bfloat16")
PASSES = ("fwd", "bwd")
IMPLS = ("cupyflash", "cupyflash-det", "naive-cupy", "torch-flash", "torch-cudnn", "torch-efficient")
IMPL_PASSES = {"cupyflash-det": ("bwd",)}  # every other impl runs both passes
TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                  "torch-efficient": "EFFICIENT_ATTENTION"}
RATIO_PEERS = ("torch-flash", "torch-cudnn")  # the table's "cupyflash / peer" columns
PASS_TENSORS = {"fwd": ("out",), "bwd": ("dq", "dk", "dv")}
# max|ours - reference| / max|reference| below which a result counts as correct.
TOLERANCE = {"float16": 5e-3, "bfloat16": 2e-2}
CHECK_ROWS = 64  # query rows of the float32 slice reference used when naive-cupy does not fit
NAIVE_MEMORY_FRACTION = 0.4  # naive-cupy runs when its float32 (B, H, S, S) scores fit in this share
# naive-cupy is 10-100x slower than the fused kernels and only there for scale: a few runs suffice.
NAIVE_MAX_RUNS, NAIVE_MAX_WARMUP = 5, 1
MIB = 2**20
GB = 1e9
MAX_MESSAGE = 600  # characters kept of an exception or warning text

Array = Any  # a numpy.ndarray or a cupy.ndarray
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- shapes and FLOPs


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked problem: q, k, v are (batch, seqlen, heads, head_dim); seqlen_q == seqlen_k."""

    dtype: str  # "float16" | "bfloat16"
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.dtype}-d{self.head_dim}-s{self.seqlen}-{mask}-b{self.batch}h{self.heads}"


def paper_grid(dtypes: Sequence[str] = DTYPES, head_dims: Sequence[int] = (64, 128, 256),
               seqlens: Sequence[int] = (512, 1024, 2048, 4096, 8192, 16384),
               causal: Sequence[bool] = (False, True), tokens: int = 16384, hidden: int = 2048) -> list[BenchShape]:
    """The FlashAttention papers' grid: batch = tokens // seqlen, heads = hidden // head_dim.

    Ordered dtype, head_dim, seqlen, causal (the order of PEERS.md's table).
    """
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not benchmarked; choose from {DTYPES}")
    for seqlen in seqlens:
        if not 0 < seqlen <= tokens:
            raise ValueError(f"seqlen {seqlen} must be in [1, tokens = {tokens}]: batch = tokens // seqlen")
    for head_dim in head_dims:
        if not 0 < head_dim <= hidden:
            raise ValueError(f"head_dim {head_dim} must be in [1, hidden = {hidden}]: heads = hidden // head_dim")
    return [BenchShape(dtype, d, s, bool(c), tokens // s, hidden // d)
            for dtype, d, s, c in itertools.product(dtypes, head_dims, seqlens, causal)]


def quick_grid() -> list[BenchShape]:
    """A few minutes' worth: float16, head_dim 64 and 128, seqlen 1024 and 4096, causal and not."""
    return paper_grid(dtypes=("float16",), head_dims=(64, 128), seqlens=(1024, 4096))


def flops(shape: BenchShape, pass_: str) -> float:
    """Floating-point operations of one pass: fwd = 4·B·H·S²·D (halved when causal), bwd = 2.5 × fwd."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    forward = 4.0 * shape.batch * shape.heads * shape.seqlen * shape.seqlen * shape.head_dim
    if shape.causal:
        forward /= 2
    return forward if pass_ == "fwd" else 2.5 * forward


def tflops(shape: BenchShape, pass_: str, ms: float) -> float:
    """TFLOP/s of one pass that took `ms` milliseconds."""
    return flops(shape, pass_) / (ms * 1e-3) / 1e12


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


# --------------------------------------------------------------------------- dtypes and naive math


def to_float32(array: Array) -> Array:
    """float16 / bfloat16 / float32 values as float32 (bfloat16 through its bits, so the array
    module needs no bfloat16 arithmetic)."""
    if array.dtype.name == "bfloat16":
        return (array.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return array.astype(np.float32)


def relative_error(ours: Array, ref: Array) -> float:
    """max|ours - ref| / max|ref| in float32 (max|ours - ref| when ref is all zeros); nan when
    ours holds a NaN or an infinity."""
    ours, ref = to_float32(ours), to_float32(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"result shape {ours.shape} differs from the reference's {ref.shape}")
    if ours.size == 0:
        return 0.0
    if not bool(abs(ours).max() < np.inf):  # NaN compares False, so it lands here too
        return math.nan
    scale = float(abs(ref).max())
    error = float(abs(ours - ref).max())
    return error / scale if scale > 0 else error


def _causal_bias(seqlen: int, xp: Any) -> Array:
    """(S, S) float32: 0 where key j <= query i, -inf above the diagonal (seqlen_q == seqlen_k)."""
    rows, cols = xp.arange(seqlen)[:, None], xp.arange(seqlen)[None, :]
    return xp.where(cols > rows, np.float32(-np.inf), np.float32(0)).astype(np.float32, copy=False)


NAIVE_BF16_NOTE = "bfloat16 computed in float32: CuPy 14's batched matmul has no bfloat16"


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


def slice_reference(q: Array, k: Array, v: Array, dout: Array, causal: bool, rows: int,
                    xp: Any) -> dict[str, Array]:
    """float32 out and dq of the last `rows` query rows of batch element 0, each (rows, H, D).

    q, dout: (B, Sq, H, D); k, v: (B, Sk, H, D). Causal is bottom-right aligned (query i sees
    key j <= i + Sk - Sq), as in cupyflash; every checked row must see at least one key. Only
    those rows' softmax is needed: (H, rows, Sk) floats, however long the sequence.
    """
    seqlen_q, seqlen_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    start = max(seqlen_q - rows, 0)
    qh, doh = (to_float32(t[0, start:]).transpose(1, 0, 2) for t in (q, dout))
    kh, vh = (to_float32(t[0]).transpose(1, 0, 2) for t in (k, v))
    scale = np.float32(reference.default_softmax_scale(head_dim))
    s = xp.matmul(qh, kh.transpose(0, 2, 1)) * scale
    if causal:
        visible = xp.arange(seqlen_k)[None, :] <= xp.arange(start, seqlen_q)[:, None] + (seqlen_k - seqlen_q)
        s = xp.where(visible, s, np.float32(-np.inf))
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = xp.matmul(p, vh)
    dp = xp.matmul(doh, vh.transpose(0, 2, 1))
    ds = p * (dp - (doh * out).sum(axis=-1, keepdims=True))
    dq = xp.matmul(ds, kh) * scale
    return {"out": out.transpose(1, 0, 2), "dq": dq.transpose(1, 0, 2)}


# --------------------------------------------------------------------------- environment


def _cuda_version(number: int) -> str:
    """12080 -> "12.8"."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _quiet(probe: Callable[[], Any]) -> Any:
    """probe(), or None when it raises (a missing library or device must not stop a report)."""
    try:
        return probe()
    except Exception:
        return None


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _torch_version() -> str | None:
    try:
        import torch
    except Exception:  # not installed, or broken: either way there is no peer to measure
        return None
    return str(torch.__version__)


def _gpu_environment() -> dict[str, Any]:
    keys = ("gpu", "compute_capability", "sm_count", "memory_gb", "driver_version", "runtime_version")
    if gpu_count() == 0:
        return dict.fromkeys(keys)
    cupy = require_cupy()
    limits = device_limits(current_device_id())
    return {"gpu": limits.name, "compute_capability": "%d.%d" % limits.compute_capability,
            "sm_count": limits.sm_count,
            "memory_gb": round(cupy.cuda.runtime.memGetInfo()[1] / GB, 1),
            "driver_version": _quiet(lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion())),
            "runtime_version": _quiet(lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))}


def environment() -> dict[str, Any]:
    """What produced the numbers: GPU, CUDA driver / runtime / NVRTC, CuPy, PyTorch (None when
    it does not import), cupyflash version, kernel source hash, git commit ("unknown" outside
    a checkout) and whether the checkout had local changes, date (UTC, ISO 8601)."""
    env = _gpu_environment()
    cupy = cupy_module()
    nvrtc = _quiet(build.nvrtc_version)
    env.update({
        "nvrtc_version": "%d.%d" % nvrtc if nvrtc else None,
        "cupy_version": cupy.__version__ if cupy is not None else None,
        "numpy_version": np.__version__,
        "torch_version": _torch_version(),
        "python_version": platform.python_version(),
        "cupyflash_version": __version__,
        "source_hash": _quiet(build.source_hash),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": _git_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return env


def describe_environment(env: dict[str, Any]) -> str:
    """One line naming the device, the software and the code that produced a report."""
    gpu = env.get("gpu") or "no GPU"
    if env.get("compute_capability"):
        gpu += (f" (sm {env['compute_capability']}, driver {env.get('driver_version')}, "
                f"runtime {env.get('runtime_version')}, NVRTC {env.get('nvrtc_version')})")
    commit = str(env.get("git_commit") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    return (f"{gpu} · CuPy {env.get('cupy_version')} · torch {env.get('torch_version') or 'not installed'} · "
            f"cupyflash {env.get('cupyflash_version')} · kernel source {env.get('source_hash')} · "
            f"commit {commit} · {env.get('date')}")


def default_stem(report: dict[str, Any]) -> str:
    """File stem for a report: the GPU's name and the date, e.g. "bench-nvidia-h100-80gb-hbm3-2026-11-24"."""
    env = report.get("environment", {})
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu") or "cpu").lower()).strip("-")
    return f"bench-{gpu}-{str(env.get('date') or 'undated')[:10]}"


# --------------------------------------------------------------------------- GPU helpers


def _free_memory() -> None:
    """Give cached device memory back (CuPy's pool, and PyTorch's cache when it is loaded)."""
    gc.collect()
    cupy = cupy_module()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _free_device_bytes() -> int:
    cupy = require_cupy()
    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def _inputs(shape: BenchShape, seed: int = 0) -> dict[str, Array]:
    """Signed normal q, k, v, dout (B, S, H, D) in shape.dtype on the current GPU."""
    cupy = require_cupy()
    rs = cupy.random.RandomState(seed)
    dims = (shape.batch, shape.seqlen, shape.heads, shape.head_dim)
    data = {}
    for name in ("q", "k", "v", "dout"):
        x = rs.standard_normal(dims, dtype=cupy.float32)
        if shape.dtype == "bfloat16":  # round in float32, keep the top 16 bits: no bf16 casts needed
            bits = reference.round_to(x, "bfloat16", cupy).view(cupy.uint32) >> cupy.uint32(16)
            data[name] = bits.astype(cupy.uint16).view(numpy_dtype("bfloat16"))
        else:
            data[name] = x.astype(numpy_dtype(shape.dtype))
    return data


def _nbytes(result: Any) -> int:
    arrays = result if isinstance(result, tuple) else (result,)
    return sum(int(a.size) * a.dtype.itemsize for a in arrays)


def _peak_extra_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s result and the peak of CuPy pool bytes in use during it, above the level before.

    Every allocation goes through a wrapper around the current allocator that samples the
    default pool's used_bytes() right after each malloc (the peak is always reached just after
    one); frees need no tracking. Counts every byte CuPy allocates during the call, the outputs
    included, rounded to the pool's 512-byte blocks.
    """
    cupy = require_cupy()
    pool = cupy.get_default_memory_pool()
    cupy.cuda.get_current_stream().synchronize()
    before = pool.used_bytes()
    peak = [before]
    previous = cupy.cuda.get_allocator()

    def counting_malloc(size: int) -> Any:
        memory = previous(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory

    cupy.cuda.set_allocator(counting_malloc)
    try:
        result = fn()
        cupy.cuda.get_current_stream().synchronize()
    finally:
        cupy.cuda.set_allocator(previous)
    return result, peak[0] - before


def _cubin_count() -> int | None:
    """Cubins in the disk cache (None when it is disabled)."""
    if not settings.disk_cache_enabled():
        return None
    directory = settings.kernel_cache_dir()
    return sum(1 for _ in directory.glob("*.cubin")) if directory.is_dir() else 0


def _first_call(fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
    """fn()'s result, its wall time in ms (compile and module load included: what a user
    waits for on a first call), and how many cubins it added to the disk cache (NVRTC runs)."""
    before = _cubin_count()
    start = time.perf_counter()
    result = fn()
    require_cupy().cuda.get_current_stream().synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    after = _cubin_count()
    return result, wall_ms, (None if before is None or after is None else after - before)


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


# --------------------------------------------------------------------------- implementations


@dataclass
class _Setup:
    """An implementation ready to time: the timed call, the outputs of one call in the
    (B, S, H, D) layout (out, or dq, dk, dv) for validation, and fields for the row."""

    fn: Callable[[], Any]
    outputs: tuple[Array, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def _setup_cupyflash(pass_: str, shape: BenchShape, data: dict[str, Array], deterministic: bool) -> _Setup:
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
    first, wall_ms, new_cubins = _first_call(fn)
    again, peak = _peak_extra_bytes(fn)
    extra = {"first_call_ms": wall_ms, "new_cubins": new_cubins, "peak_extra_mb": peak / MIB,
             "output_mb": _nbytes(again) / MIB}
    return _Setup(fn, first if isinstance(first, tuple) else (first,), extra)


def _setup_naive(pass_: str, shape: BenchShape, data: dict[str, Array]) -> _Setup:
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
    result, peak = _peak_extra_bytes(fn)
    extra.update(peak_extra_mb=peak / MIB, output_mb=_nbytes(result) / MIB)
    outputs = result if isinstance(result, tuple) else (result,)
    return _Setup(fn, tuple(o.transpose(0, 2, 1, 3) for o in outputs), extra)


def _import_torch() -> Any:
    try:
        import torch
    except Exception as exc:
        raise RuntimeError(f"PyTorch does not import ({_short(exc)}); the torch-* peers need it") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no CUDA device")
    return torch


def _to_torch(torch: Any, array: Array, contiguous: bool) -> Any:
    """A (B, S, H, D) CuPy array as a (B, H, S, D) torch view of the same memory (through
    int16 bits, so DLPack never has to carry bfloat16), or a contiguous copy."""
    tensor = torch.from_dlpack(array.view(np.int16)).view(getattr(torch, array.dtype.name)).transpose(1, 2)
    return tensor.contiguous() if contiguous else tensor


def _from_torch(torch: Any, tensor: Any, dtype: str) -> Array:
    """A (B, H, S, D) torch tensor as a (B, S, H, D) CuPy view of the same memory."""
    cupy = require_cupy()
    return cupy.from_dlpack(tensor.detach().view(torch.int16)).view(numpy_dtype(dtype)).transpose(0, 2, 1, 3)


def _torch_attempt(torch: Any, pass_: str, shape: BenchShape, data: dict[str, Array], contiguous: bool) -> _Setup:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v, dout = (_to_torch(torch, data[n], contiguous) for n in ("q", "k", "v", "dout"))
    note = {"note": "contiguous (B, H, S, D) copies: the strided views were rejected"} if contiguous else {}
    if pass_ == "fwd":
        def fn() -> Any:
            return sdpa(q, k, v, is_causal=shape.causal)

        return _Setup(fn, (_from_torch(torch, fn(), shape.dtype),), note)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = sdpa(qg, kg, vg, is_causal=shape.causal)

    def fn_bwd() -> Any:
        return torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    return _Setup(fn_bwd, tuple(_from_torch(torch, g, shape.dtype) for g in fn_bwd()), note)


def _setup_torch(pass_: str, shape: BenchShape, data: dict[str, Array]) -> _Setup:
    """torch SDPA on (B, H, S, D) views of our arrays; contiguous copies (made here, outside
    the timing) only if the backend rejects the views. Runs inside _impl_context."""
    torch = _import_torch()
    try:
        return _torch_attempt(torch, pass_, shape, data, contiguous=False)
    except RuntimeError as exc:
        first = exc
    try:
        return _torch_attempt(torch, pass_, shape, data, contiguous=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{_short(exc)} (strided views: {_short(first)})") from exc


def _setup(impl: str, pass_: str, shape: BenchShape, data: dict[str, Array]) -> _Setup:
    if impl in ("cupyflash", "cupyflash-det"):
        return _setup_cupyflash(pass_, shape, data, deterministic=impl == "cupyflash-det")
    if impl == "naive-cupy":
        return _setup_naive(pass_, shape, data)
    return _setup_torch(pass_, shape, data)


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


@contextmanager
def _impl_context(impl: str) -> Iterator[list]:
    """For torch-*: the SDPA backend pinned, CuPy's current stream = torch's, and torch's
    warnings (the reasons a backend declines a shape) collected. Yields the warnings list."""
    if impl not in TORCH_BACKENDS:
        yield []
        return
    torch = _import_torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, TORCH_BACKENDS[impl])
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend), _cupy_stream_of(torch):
        warnings.simplefilter("always")
        yield caught


def available_impls() -> tuple[str, ...]:
    """The default implementations: all of IMPLS, less the torch-* peers when PyTorch is absent."""
    import importlib.util

    has_torch = _quiet(lambda: importlib.util.find_spec("torch")) is not None
    return tuple(i for i in IMPLS if has_torch or i not in TORCH_BACKENDS)


# --------------------------------------------------------------------------- validation


@dataclass
class _Reference:
    """What results are checked against: kind "naive" (naive-cupy's out, dq, dk, dv, (B, S, H, D)),
    "slice" (float32 out and dq of the last CHECK_ROWS query rows of batch 0) or None."""

    kind: str | None
    tensors: dict[str, Array]
    note: str | None = None  # why the reference is not the naive one
    naive_skip: str | None = None  # set when naive-cupy would not fit in memory


def _naive_reference(shape: BenchShape, data: dict[str, Array], passes: Sequence[str]) -> dict[str, Array]:
    cupy = require_cupy()
    q, k, v, dout = (data[n] for n in ("q", "k", "v", "dout"))
    p, out = naive_forward(q, k, v, shape.causal, cupy)
    tensors = {"out": out.transpose(0, 2, 1, 3)}
    if "bwd" in passes:
        grads = naive_backward(dout, q, k, v, p, out, cupy)
        tensors.update(zip(PASS_TENSORS["bwd"], (g.transpose(0, 2, 1, 3) for g in grads)))
    return tensors


def _reference(shape: BenchShape, data: dict[str, Array], passes: Sequence[str]) -> _Reference:
    """naive-cupy's results when they fit in memory, else the float32 slice reference."""
    skip = naive_skip_reason(shape, _free_device_bytes())
    reason = skip
    if skip is None:
        try:
            return _Reference("naive", _naive_reference(shape, data, passes))
        except Exception as exc:  # out of memory, or a CuPy without bfloat16 matmul
            reason = f"naive reference failed: {_short(exc)}"
        _free_memory()
    try:
        tensors = slice_reference(*(data[n] for n in ("q", "k", "v", "dout")), shape.causal, CHECK_ROWS,
                                  require_cupy())
        return _Reference("slice", tensors, reason, skip)
    except Exception as exc:
        return _Reference(None, {}, f"{reason}; float32 slice reference failed: {_short(exc)}", skip)


def _worst(errors: Iterable[float]) -> float:
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _judge(impl: str, ref: _Reference, pass_: str, outputs: tuple[Array, ...], dtype: str) -> dict[str, Any]:
    """valid / error / errors / check fields of a row: max|ours - ref| / max|ref| per tensor,
    valid when the worst is below TOLERANCE[dtype]."""
    if impl == "naive-cupy" and ref.kind == "naive":
        return {"reference": True}  # the others are checked against this very result
    names = PASS_TENSORS[pass_]
    note = None
    if ref.kind == "slice":
        rows = ref.tensors["out"].shape[0]
        names, outputs = names[:1], (outputs[0][0, -rows:],)
        note = f"checked {names[0]} of the last {rows} query rows of batch 0 only, in float32 ({ref.note})"
    if not all(name in ref.tensors for name in names):
        return {"valid": None, "note": f"not validated: {ref.note}"}
    errors = {name: relative_error(ours, ref.tensors[name]) for name, ours in zip(names, outputs)}
    worst = _worst(errors.values())
    judged = {"valid": bool(worst < TOLERANCE[dtype]), "error": worst, "errors": errors, "check": ref.kind}
    return {**judged, "note": note} if note else judged


# --------------------------------------------------------------------------- measuring


def _row(impl: str, pass_: str, shape: BenchShape) -> dict[str, Any]:
    return {"impl": impl, "pass": pass_, "dtype": shape.dtype, "head_dim": shape.head_dim,
            "seqlen": shape.seqlen, "causal": shape.causal, "batch": shape.batch, "heads": shape.heads,
            "ms": None, "tflops": None, "valid": None, "error": None}


def _add(row: dict[str, Any], fields: dict[str, Any]) -> None:
    """row.update(fields), except that notes accumulate ("; "-separated) instead of replacing."""
    notes = [n for n in (row.get("note"), fields.get("note")) if n]
    row.update(fields)
    if notes:
        row["note"] = "; ".join(notes)


def _measure(impl: str, pass_: str, shape: BenchShape, data: dict[str, Array], ref: _Reference,
             runs: int, warmup: int) -> dict[str, Any]:
    """One row: set up, check one call's outputs, then time. Failures are recorded, not raised."""
    row = _row(impl, pass_, shape)
    if impl == "naive-cupy" and ref.naive_skip:
        row["note"] = ref.naive_skip
        return row
    caught: list = []
    try:
        with _impl_context(impl) as caught:
            setup = _setup(impl, pass_, shape, data)
            _add(row, setup.extra)
            _add(row, _judge(impl, ref, pass_, setup.outputs, shape.dtype))
            if impl == "naive-cupy":
                runs, warmup = min(runs, NAIVE_MAX_RUNS), min(warmup, NAIVE_MAX_WARMUP)
            timing = do_bench(setup.fn, warmup=warmup, runs=runs)
    except Exception as exc:
        texts = sorted({" ".join(str(w.message).split())[:MAX_MESSAGE] for w in caught})
        row["failure"] = _short(exc) + "".join(f" | warning: {t}" for t in texts[:3])
        return row
    row.update(ms=timing.median_ms, ms_min=timing.min_ms, ms_max=timing.max_ms, runs=timing.runs,
               tflops=tflops(shape, pass_, timing.median_ms))
    if caught:
        row["warnings"] = sorted({" ".join(str(w.message).split())[:MAX_MESSAGE] for w in caught})
    return row


def _describe(row: dict[str, Any]) -> str:
    """One progress line for a finished row."""
    shape = BenchShape(row["dtype"], row["head_dim"], row["seqlen"], row["causal"], row["batch"], row["heads"])
    head = f"{shape.id} {row['impl']} {row['pass']}: "
    if row.get("failure"):
        return head + "failed: " + row["failure"]
    if row["ms"] is None:
        return head + str(row.get("note"))
    verdict = {True: "valid", False: "INVALID", None: "not validated"}[row["valid"]]
    if row.get("reference"):
        verdict = "the reference"
    error = f" (error {row['error']:.2e})" if isinstance(row.get("error"), float) else ""
    return head + f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s, {verdict}{error}"


def _check_run_args(passes: Sequence[str], impls: Sequence[str], runs: int, warmup: int) -> None:
    unknown = [p for p in passes if p not in PASSES] + [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown pass or impl {unknown}; passes are {PASSES}, impls are {IMPLS}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if gpu_count() == 0:
        raise RuntimeError("cupyflash.bench.run needs a CUDA GPU and CuPy; none is visible")


def run(shapes: Sequence[BenchShape], *, passes: Sequence[str] = PASSES, impls: Sequence[str] | None = None,
        runs: int = 20, warmup: int = 3, progress: Progress | None = None,
        compile_times: bool = False) -> dict[str, Any]:
    """Validate, then time every (shape, pass, impl) on the current GPU; returns the report.

    Report: {"environment": environment(), "settings": {...}, "rows": [...], "compile_times": [...]}.
    A row: impl, pass, dtype, head_dim, seqlen, causal, batch, heads, ms (median, milliseconds),
    tflops, valid (True / False / None = not checked), error (max|ours - ref| / max|ref|), and
    where they apply: ms_min, ms_max, runs (timed runs: `runs`, at most NAIVE_MAX_RUNS for
    naive-cupy), errors (per tensor), check ("naive" or "slice"), reference
    (True on the naive-cupy row the others were checked against), note,
    failure (the exception text when an impl raised), warnings (torch's), and for cupyflash*:
    first_call_ms (wall time of the first call, NVRTC compile and module load included),
    new_cubins (kernels NVRTC compiled during it; None with the disk cache off), peak_extra_mb
    (MiB CuPy allocated at the peak of one call, outputs included) and output_mb (MiB of the
    returned arrays): peak_extra_mb - output_mb is the scratch, O(seqlen), never O(seqlen²).
    naive-cupy rows carry peak_extra_mb and output_mb too, for contrast (its saved P excluded).
    compile_times=True adds measure_compile_times() for the shapes' dtypes and head dims.
    progress(message) is called once per (shape, impl, pass) with the result.
    """
    impls = available_impls() if impls is None else tuple(impls)
    _check_run_args(passes, impls, runs, warmup)
    say = progress or (lambda message: None)
    jobs = [(p, i) for p in passes for i in impls if p in IMPL_PASSES.get(i, PASSES)]
    report = {"environment": environment(), "rows": [], "compile_times": [],
              "settings": {"runs": runs, "warmup": warmup, "passes": list(passes), "impls": list(impls),
                           "tolerance": TOLERANCE, "check_rows": CHECK_ROWS,
                           "naive_memory_fraction": NAIVE_MEMORY_FRACTION, "naive_max_runs": NAIVE_MAX_RUNS}}
    if compile_times:  # first, while this process has compiled nothing (build.py memoizes programs)
        dtypes = sorted({s.dtype for s in shapes})
        report["compile_times"] = measure_compile_times(dtypes, sorted({s.head_dim for s in shapes}))
    for n, shape in enumerate(shapes):
        data = _inputs(shape)
        ref = _reference(shape, data, passes)
        for m, (pass_, impl) in enumerate(jobs):
            row = _measure(impl, pass_, shape, data, ref, runs, warmup)
            report["rows"].append(row)
            _free_memory()
            say(f"[{n * len(jobs) + m + 1}/{len(shapes) * len(jobs)}] {_describe(row)}")
        del data, ref
        _free_memory()
    return report


# --------------------------------------------------------------------------- compile times


def _default_specs(dtype: str, kernel_dim: int, limits: Any) -> list[tuple[str, build.KernelSpec]]:
    """(pass, spec) of every kernel a default-config call runs: fwd; bwd; bwd-det (deterministic)."""
    from . import heuristics, launch

    fwd = heuristics.default_fwd_config(kernel_dim, limits)
    bwd = heuristics.default_bwd_config(kernel_dim, limits)
    dq_pass = launch.dq_spec(dtype, kernel_dim, bwd.dq)
    specs = [("fwd", launch.fwd_spec(dtype, kernel_dim, fwd)),
             ("bwd", launch.prep_spec(dtype, "flash_bwd_delta")),
             ("bwd", launch.dkdv_spec(dtype, kernel_dim, bwd.dkdv, bwd.dq_atomic))]
    if bwd.dq_atomic:
        specs += [("bwd", launch.prep_spec(dtype, launch.convert_dq_entry(bwd.dkdv))),
                  ("bwd-det", launch.dkdv_spec(dtype, kernel_dim, bwd.dkdv, False)), ("bwd-det", dq_pass)]
    else:
        specs.append(("bwd", dq_pass))
    return specs


def measure_compile_times(dtypes: Sequence[str] = DTYPES, head_dims: Sequence[int] = (64, 128, 256), *,
                          limits: Any = None) -> list[dict[str, Any]]:
    """Seconds NVRTC takes to compile each kernel of the default (heuristic) configs, straight
    through build.compile_kernel (no disk cache), for `limits` (a device.DeviceLimits; default
    the current GPU's; a made-up one works without a GPU). Kernels shared between head dims
    (the δ and dQ-convert kernels) are compiled once. One dict per kernel: dtype, head_dim,
    pass, entry, arch, seconds, registers, spill_bytes, memoized (True when build.py already
    held the program, so seconds is not a compile: call this before anything else compiles;
    the δ and dQ-convert entry points share one program), and failure (the error text) when
    the compile failed. NVRTC 12.9+ also keeps a cache of its own: on the H100 machine (NVRTC
    13.0) a program compiled before, in this process or an earlier one, came back in about
    40 ms with an empty log, so honest numbers need a machine that has not compiled these
    kernels yet."""
    from .config import kernel_head_dim

    limits = limits if limits is not None else device_limits(current_device_id())
    rows, seen = [], set()
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        for pass_, spec in _default_specs(dtype, kernel_head_dim(head_dim), limits):
            if spec in seen:
                continue
            seen.add(spec)
            rows.append({"dtype": dtype, "head_dim": head_dim, "pass": pass_, "entry": spec.entry,
                         "arch": spec.target(limits.arch), **_time_compile(spec, limits.arch)})
    return rows


def _memoized(spec: build.KernelSpec, arch: str) -> bool:
    """Whether build.py already holds spec's program (compiled earlier in this process, or by
    another entry point of the same file): compiling it again costs nothing."""
    key_of, programs = getattr(build, "_program_key", None), getattr(build, "_programs", None)
    return bool(key_of is not None and programs is not None and key_of(spec, arch) in programs)


def _time_compile(spec: build.KernelSpec, arch: str) -> dict[str, Any]:
    """seconds, registers, spill_bytes, memoized of one compile; a failure is recorded, not raised."""
    memoized = _memoized(spec, arch)
    start = time.perf_counter()
    try:
        kernel = build.compile_kernel(spec, arch)
    except Exception as exc:
        return {"seconds": time.perf_counter() - start, "registers": None, "spill_bytes": None,
                "memoized": memoized, "failure": _short(exc)}
    return {"seconds": time.perf_counter() - start, "registers": kernel.registers, "spill_bytes": kernel.spill_bytes,
            "memoized": memoized}


# --------------------------------------------------------------------------- tables


def _impl_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in IMPLS if i in present] + [i for i in present if i not in IMPLS]


def _shape_key(row: dict[str, Any]) -> tuple:
    return row["dtype"], row["head_dim"], row["seqlen"], row["causal"]


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _cell(row: dict[str, Any] | None) -> str:
    """TFLOP/s, "✗" appended when the result failed validation, "?" when it was not checked,
    "-" when there is no number (not run, skipped, failed)."""
    if row is None or not isinstance(row.get("tflops"), (int, float)):
        return "-"
    mark = "" if row.get("reference") else {False: " ✗", None: " ?", True: ""}[row.get("valid")]
    return _number(row["tflops"]) + mark


def _ratio(ours: dict[str, Any] | None, peer: dict[str, Any] | None) -> str:
    if ours is None or peer is None or not ours.get("tflops") or not peer.get("tflops"):
        return "-"
    if ours.get("valid") is False or peer.get("valid") is False:
        return "✗"
    return f"{ours['tflops'] / peer['tflops']:.2f}"


def format_table(report: dict[str, Any], pass_: str) -> str:
    """Markdown: one row per shape (dtype | D | S | causal | TFLOP/s per impl | cupyflash / peer
    ratios), under a line naming the GPU, date, commit and kernel source hash."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    rows = [r for r in report["rows"] if r["pass"] == pass_]
    impls = _impl_order(rows)
    peers = [p for p in RATIO_PEERS if p in impls] if "cupyflash" in impls else []
    index = {(_shape_key(r), r["impl"]): r for r in rows}
    title = {"fwd": "Forward", "bwd": "Backward"}[pass_]
    runs = report.get("settings", {}).get("runs")
    lines = [f"**{title} TFLOP/s** (median of {runs} runs) — {describe_environment(report.get('environment', {}))}",
             "", "| " + " | ".join(["dtype", "D", "S", "causal", *impls, *(f"cupyflash / {p}" for p in peers)]) + " |",
             "|" + "---|" * (4 + len(impls) + len(peers))]
    for key in dict.fromkeys(_shape_key(r) for r in rows):
        cells = [key[0], str(key[1]), str(key[2]), "1" if key[3] else "0"]
        cells += [_cell(index.get((key, i))) for i in impls]
        cells += [_ratio(index.get((key, "cupyflash")), index.get((key, p))) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no results) |")
    lines += ["", "✗ failed validation (timed anyway) · ? not validated · - not run, skipped or failed"]
    return "\n".join(lines)


def format_memory_table(report: dict[str, Any]) -> str:
    """Markdown: peak extra MiB of one call (cupyflash and naive-cupy), its outputs, and the
    difference (scratch: O(seqlen) for cupyflash, O(seqlen²) for naive-cupy)."""
    lines = ["**Device memory of one call** (MiB allocated through CuPy at the peak, outputs included)", "",
             "| impl | pass | dtype | D | S | causal | peak extra | outputs | scratch |", "|" + "---|" * 9]
    for r in report["rows"]:
        if isinstance(r.get("peak_extra_mb"), (int, float)):
            lines.append(f"| {r['impl']} | {r['pass']} | {r['dtype']} | {r['head_dim']} | {r['seqlen']} | "
                         f"{int(r['causal'])} | {r['peak_extra_mb']:.1f} | {r['output_mb']:.1f} | "
                         f"{r['peak_extra_mb'] - r['output_mb']:.1f} |")
    return "\n".join(lines)


def first_calls(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The first measured call per (impl, pass, dtype, head_dim, causal): wall ms and new cubins."""
    firsts: dict[tuple, dict[str, Any]] = {}
    for r in report["rows"]:
        if "first_call_ms" in r:
            key = (r["impl"], r["pass"], r["dtype"], r["head_dim"], r["causal"])
            firsts.setdefault(key, {"impl": r["impl"], "pass": r["pass"], "dtype": r["dtype"],
                                    "head_dim": r["head_dim"], "causal": r["causal"], "seqlen": r["seqlen"],
                                    "first_call_ms": r["first_call_ms"], "new_cubins": r.get("new_cubins")})
    return list(firsts.values())


def format_compile_table(report: dict[str, Any]) -> str:
    """Markdown: first-call wall times seen by run(), and NVRTC times when measured."""
    lines = ["**First calls** (wall ms, compile and module load included; new cubins = NVRTC runs)", "",
             "| impl | pass | dtype | D | causal | S | first call ms | new cubins |", "|" + "---|" * 8]
    for f in first_calls(report):
        lines.append(f"| {f['impl']} | {f['pass']} | {f['dtype']} | {f['head_dim']} | {int(f['causal'])} | "
                     f"{f['seqlen']} | {f['first_call_ms']:.0f} | {f['new_cubins']} |")
    if report.get("compile_times"):
        lines += ["", "**NVRTC compile times** (default configs, no disk cache; (shared) = program already "
                  "compiled in this process)", "",
                  "| dtype | D | pass | kernel | arch | seconds | registers | spill bytes |", "|" + "---|" * 8]
        lines += [f"| {c['dtype']} | {c['head_dim']} | {c['pass']} | {c['entry']} | {c['arch']} | "
                  f"{'(shared)' if c.get('memoized') else format(c['seconds'], '.2f')} | {c['registers']} | "
                  f"{c['spill_bytes']} |" for c in report["compile_times"]]
        lines += [f"\n{c['entry']} ({c['dtype']}, D {c['head_dim']}) failed: {c['failure']}"
                  for c in report["compile_times"] if c.get("failure")]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Every table of a report, as one markdown document."""
    passes = [p for p in PASSES if any(r["pass"] == p for r in report["rows"])]
    parts = [format_table(report, p) for p in passes]
    invalid = [r for r in report["rows"] if r.get("valid") is False]
    failed = [r for r in report["rows"] if r.get("failure")]
    parts.append(f"{len(report['rows'])} results: {len(invalid)} failed validation, {len(failed)} raised.")
    parts += [format_memory_table(report), format_compile_table(report)]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- files and plots


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NumPy scalars unwrapped, tuples as lists, non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": strict JSON has no such numbers
    if isinstance(value, Path):
        return str(value)
    return value


def save(report: dict[str, Any], directory: str | Path, stem: str) -> list[Path]:
    """Write <directory>/<stem>.json (the whole report) and <stem>.md (format_report), each
    atomically (a temporary file renamed into place). Returns both paths."""
    directory = Path(directory)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    text = json.dumps(_jsonable(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    build.write_atomic(json_path, text.encode())
    build.write_atomic(md_path, format_report(report).encode())
    return [json_path, md_path]


def load(path: str | Path) -> dict[str, Any]:
    """A report written by save()."""
    return json.loads(Path(path).read_text())


def plot_series(report: dict[str, Any], dtype: str = "float16",
                causal: bool = False) -> dict[tuple[str, int], dict[str, list[tuple[int, float]]]]:
    """{(pass, head_dim): {impl: [(seqlen, TFLOP/s), ...] sorted by seqlen}} for one dtype and
    causality; results that failed validation or have no time are left out."""
    series: dict[tuple[str, int], dict[str, list[tuple[int, float]]]] = {}
    for r in report["rows"]:
        if r["dtype"] != dtype or bool(r["causal"]) != causal or r.get("valid") is False:
            continue
        if not isinstance(r.get("tflops"), (int, float)):
            continue
        series.setdefault((r["pass"], r["head_dim"]), {}).setdefault(r["impl"], []).append((r["seqlen"], r["tflops"]))
    for by_impl in series.values():
        for points in by_impl.values():
            points.sort()
    return series


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def _plot_choice(report: dict[str, Any], dtype: str | None, causal: bool | None) -> tuple[str, bool]:
    """The (dtype, causal) to plot: as given, else float16 and non-causal when present."""
    combos = list(dict.fromkeys((r["dtype"], bool(r["causal"])) for r in report["rows"]))
    combos = [c for c in combos if dtype in (None, c[0]) and causal in (None, c[1])]
    if not combos:
        return (dtype or "float16", bool(causal))
    return min(combos, key=lambda c: (c[0] != "float16", c[1]))


def plot(report: dict[str, Any], path: str | Path, *, dtype: str | None = None, causal: bool | None = None) -> Path:
    """PNG of TFLOP/s against seqlen (log2 axis) per implementation, one panel per (pass,
    head_dim), for one dtype and causality (default: float16 and non-causal if the report has
    them, else what it has). Needs matplotlib (imported here, not when bench is imported)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("cupyflash.bench.plot needs matplotlib: pip install 'cupyflash[plot]'") from exc
    dtype, causal = _plot_choice(report, dtype, causal)
    series = plot_series(report, dtype, causal)
    if not series:
        raise ValueError(f"no valid {dtype} {'causal' if causal else 'non-causal'} results to plot")
    passes = [p for p in PASSES if any(key[0] == p for key in series)]
    dims = sorted({key[1] for key in series})
    figure = Figure(figsize=(4.2 * len(dims), 3.4 * len(passes)), layout="constrained")
    axes = figure.subplots(len(passes), len(dims), squeeze=False)
    for (i, pass_), (j, head_dim) in itertools.product(enumerate(passes), enumerate(dims)):
        ax = axes[i][j]
        for impl in _impl_order({"impl": name} for name in series.get((pass_, head_dim), {})):
            xs, ys = zip(*series[(pass_, head_dim)][impl])
            color = f"C{IMPLS.index(impl) % 10}" if impl in IMPLS else None  # one colour per impl in every panel
            ax.plot(xs, ys, marker="o", label=impl, color=color)
        seqlens = sorted({x for points in series.get((pass_, head_dim), {}).values() for x, _ in points})
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(seqlens, [_seqlen_label(s) for s in seqlens])
        ax.set(title=f"{pass_}, head_dim {head_dim}", xlabel="seqlen", ylabel="TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _legend(figure, axes)
    env = report.get("environment", {})
    figure.suptitle(f"{env.get('gpu')} · {dtype} · {'causal' if causal else 'non-causal'} · "
                    f"commit {str(env.get('git_commit'))[:12]} · kernels {env.get('source_hash')}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path


def _legend(figure: Any, axes: Any) -> None:
    """One legend for every panel, below them (inside the first panel on matplotlib < 3.7)."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = _impl_order({"impl": label} for label in handles)
    try:
        figure.legend([handles[x] for x in labels], labels, loc="outside lower center", ncols=len(labels),
                      fontsize=8)
    except (TypeError, ValueError):  # "outside" placement is matplotlib 3.7+
        axes.flat[0].legend([handles[x] for x in labels], labels, fontsize=7)


def save_plots(report: dict[str, Any], directory: str | Path, stem: str) -> list[Path]:
    """One plot() per (dtype, causal) present: <directory>/<stem>-<dtype>-<causal|full>.png."""
    combos = dict.fromkeys((r["dtype"], bool(r["causal"])) for r in report["rows"])
    paths = []
    for dtype, causal in combos:
        if plot_series(report, dtype, causal):
            name = f"{stem}-{dtype}-{'causal' if causal else 'full'}.png"
            paths.append(plot(report, Path(directory) / name, dtype=dtype, causal=causal))
    return paths


__all__ = ["BenchShape", "paper_grid", "quick_grid", "flops", "tflops", "run", "environment",
           "describe_environment", "default_stem", "measure_compile_times", "format_table",
           "format_memory_table", "format_compile_table", "format_report", "first_calls", "save", "load",
           "plot", "plot_series", "save_plots", "naive_forward", "naive_backward", "slice_reference",
           "relative_error", "naive_skip_reason", "naive_score_bytes", "available_impls"]
