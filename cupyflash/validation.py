"""The validation matrix: the kernels against the float64 reference with the tolerance rule,
and, without a GPU, the tiled NumPy algorithm against the naive one. Used by the GPU tests,
`cupyflash validate` and scripts.

    from cupyflash import validation
    for case in validation.gpu_matrix(quick=True):
        for result in validation.run_gpu_case(case):
            print(result.message() if not result.ok else f"{case.id} {result.name} ok")
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import reference, reference_tiled
from .problem import numpy_dtype
from .tolerance import Comparison, compare

HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 192, 256)
LENGTHS = ((1, 1), (17, 17), (113, 203), (203, 113), (1023, 1024), (1024, 1023), (4097, 4097))
QUICK_HEAD_DIMS = (40, 64, 128, 256)
QUICK_LENGTHS = ((1, 1), (113, 203), (203, 113), (1023, 1024))


@dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    causal: bool
    seqlen_q: int
    seqlen_k: int
    group: int = 1  # heads_q / heads_kv
    batch: int = 2
    heads_kv: int = 2
    layout: str = "contiguous"  # or "packed": q, k, v are strided views of one (B, S, 3, H, D) array
    q_scale: float = 1.0  # > 1 gives large logits
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        parts = [self.dtype, f"d{self.head_dim}", "causal" if self.causal else "full",
                 f"{self.seqlen_q}x{self.seqlen_k}", f"g{self.group}", f"b{self.batch}"]
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.q_scale != 1.0:
            parts.append(f"qx{self.q_scale:g}")
        if self.window != (-1, -1):
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        return "-".join(parts)


def gpu_matrix(quick: bool = False) -> list[Case]:
    """dtypes x head dims x causal x awkward lengths x GQA, plus packed views, large logits, windows."""
    dims, lengths = (QUICK_HEAD_DIMS, QUICK_LENGTHS) if quick else (HEAD_DIMS, LENGTHS)
    cases = [Case(dtype, d, causal, sq, sk, group)
             for dtype, d, causal, (sq, sk), group in itertools.product(
                 ("float16", "bfloat16"), dims, (False, True), lengths, (1, 4))]
    extras = [Case("float16", 128, True, 1024, 1024, layout="packed"),
              Case("bfloat16", 64, False, 203, 203, layout="packed"),
              Case("float16", 128, False, 512, 512, q_scale=10.0),
              Case("bfloat16", 64, True, 512, 512, q_scale=10.0),
              Case("float16", 64, False, 300, 500, window=(64, 16)),
              Case("bfloat16", 128, True, 500, 300, window=(32, -1))]
    return cases + extras


INPUT_DTYPES = ("float16", "bfloat16")


def random_inputs(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], dtype: str, *, seed: int = 0,
                  xp: ModuleType = np, q_scale: float = 1.0) -> dict[str, Any]:
    """Signed normal q, k, v, dout for one problem: every test, check and timing draws its
    inputs here.

    q_shape (B, Sq, Hq, D) for q and dout, kv_shape (B, Sk, Hkv, D) for k and v. Drawn in
    float32 by xp.random.default_rng(seed) in the order q, k, v, dout, q times q_scale (> 1
    gives large logits), then rounded to nearest (ties to even) in `dtype` ("float16" or
    "bfloat16"). xp: numpy (host arrays) or cupy (drawn on the current GPU, no host copy).
    """
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"dtype is {dtype!r}; random inputs are one of {INPUT_DTYPES}")
    rng = xp.random.default_rng(seed)
    q = rng.standard_normal(q_shape, dtype=np.float32) * q_scale
    k, v = (rng.standard_normal(kv_shape, dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal(q_shape, dtype=np.float32)
    return {name: _rounded(x, dtype, xp) for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout))}


def _rounded(x: Any, dtype: str, xp: ModuleType) -> Any:
    """float32 x as `dtype`. bfloat16 keeps the top 16 bits of the rounded float32 value, so the
    array module needs no bfloat16 cast (CuPy has none); the values equal a cast's."""
    if dtype == "bfloat16":
        bits = reference.round_to(x, "bfloat16", xp).view(xp.uint32) >> xp.uint32(16)
        return bits.astype(xp.uint16).view(numpy_dtype("bfloat16"))
    return x.astype(numpy_dtype(dtype))


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Signed normal q, k, v, dout on the host, already rounded to the case's dtype."""
    heads_q = case.heads_kv * case.group
    return random_inputs((case.batch, case.seqlen_q, heads_q, case.head_dim),
                         (case.batch, case.seqlen_k, case.heads_kv, case.head_dim), case.dtype, seed=seed,
                         q_scale=case.q_scale)


def to_device(case: Case, host: dict[str, np.ndarray]) -> dict[str, Any]:
    """make_inputs' arrays on the current GPU, in the case's layout: contiguous, or q, k, v as
    strided views of one (B, S, 3, H, D) buffer ("packed")."""
    import cupy

    if case.layout == "packed":  # one (B, S, 3, H, D) buffer, q, k, v are strided views of it
        if case.seqlen_q != case.seqlen_k or case.group != 1:
            raise ValueError(f"{case.id}: a packed layout needs seqlen_q == seqlen_k and group 1")
        packed = cupy.asarray(np.stack([host["q"], host["k"], host["v"]], axis=2))
        return {"q": packed[:, :, 0], "k": packed[:, :, 1], "v": packed[:, :, 2], "dout": cupy.asarray(host["dout"])}
    return {name: cupy.asarray(array) for name, array in host.items()}




def poison_pool(*specs: tuple[tuple[int, ...], Any]) -> None:
    """Fill pool blocks of the given (shape, dtype)s with all-ones bits (NaN in fp16, bf16 and
    fp32) and free them: CuPy's pool hands the same blocks to the next allocations of those
    sizes, so an output element the kernels leave unwritten reads NaN and fails the check."""
    import cupy

    blocks = [cupy.empty(shape, dtype) for shape, dtype in specs]
    for block in blocks:
        block.view(cupy.uint8).fill(0xFF)
    del blocks


def run_gpu_case(case: Case, *, backward: bool = True, deterministic: bool = False,
                 seed: int = 0) -> list[Comparison]:
    """Runs the kernels on one case; returns comparisons for out, lse (and dq, dk, dv)."""
    import cupy

    from . import api

    host = make_inputs(case, seed)
    dev = to_device(case, host)
    options = dict(causal=case.causal, window_size=case.window)
    q_dev, k_dev = dev["q"], dev["k"]
    poison_pool((q_dev.shape, q_dev.dtype), ((case.batch, q_dev.shape[2], case.seqlen_q), np.float32))
    out, lse = api.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **options)
    dev64 = {name: cupy.asarray(array.astype(np.float64)) for name, array in host.items()}
    ref_out, ref_lse = reference.attention_forward(dev64["q"], dev64["k"], dev64["v"], xp=cupy, **options)
    base_out, base_lse = reference.attention_forward(dev64["q"], dev64["k"], dev64["v"], xp=cupy,
                                                     compute_dtype=case.dtype, **options)
    results = [compare("out", out, ref_out, base_out, case.dtype), compare("lse", lse, ref_lse, base_lse, "lse")]
    if backward:
        poison_pool((q_dev.shape, q_dev.dtype), (k_dev.shape, k_dev.dtype), (k_dev.shape, k_dev.dtype))
        grads = api.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse,
                                       deterministic=deterministic, **options)
        ref_grads = reference.attention_backward(dev64["dout"], dev64["q"], dev64["k"], dev64["v"], xp=cupy, **options)
        base_grads = reference.attention_backward(dev64["dout"], dev64["q"], dev64["k"], dev64["v"], xp=cupy,
                                                  compute_dtype=case.dtype, **options)
        for name, ours, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
            results.append(compare(name, ours, ref, base, case.dtype))
    return results


# --- without a GPU: the tiled algorithm (reference_tiled.py) against the naive reference ---

@dataclass(frozen=True)
class CpuCase:
    seqlen_q: int
    seqlen_k: int
    block_m: int
    block_n: int
    causal: bool
    group: int = 1
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else ("window" if self.window != (-1, -1) else "full")
        return f"{self.seqlen_q}x{self.seqlen_k}-blocks{self.block_m}x{self.block_n}-{mask}-g{self.group}"


def cpu_matrix(quick: bool = False) -> list[CpuCase]:
    lengths = ((1, 1), (17, 17), (113, 203), (203, 113)) if quick else ((1, 1), (17, 17), (113, 203), (203, 113),
                                                                        (256, 255), (64, 300))
    blocks = ((16, 32), (3, 5)) if quick else ((16, 32), (3, 5), (64, 64), (1, 7))
    cases = [CpuCase(sq, sk, bm, bn, causal, group)
             for (sq, sk), (bm, bn), causal, group in itertools.product(lengths, blocks, (False, True), (1, 2))]
    return cases + [CpuCase(113, 203, 16, 32, False, window=(20, 5)), CpuCase(203, 113, 16, 32, True, window=(7, -1))]


def run_cpu_case(case: CpuCase, seed: int = 0) -> dict[str, float]:
    """Max |tiled - naive| for out, lse, dq, dk, dv in float64 (all should be ~1e-15)."""
    rng = np.random.default_rng(seed)
    heads_kv, head_dim = 1, 16
    q = rng.standard_normal((1, case.seqlen_q, heads_kv * case.group, head_dim))
    k, v = (rng.standard_normal((1, case.seqlen_k, heads_kv, head_dim)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    opts = dict(causal=case.causal, window_size=case.window)
    out, lse = reference.attention_forward(q, k, v, **opts)
    tiled_out, tiled_lse = reference_tiled.flash_forward(q, k, v, block_m=case.block_m, block_n=case.block_n, **opts)
    grads = reference.attention_backward(dout, q, k, v, **opts)
    tiled_grads = reference_tiled.flash_backward(dout, q, k, v, tiled_out, tiled_lse, block_m=case.block_m,
                                                 block_n=case.block_n, **opts)
    with np.errstate(invalid="ignore"):  # inf - inf where both lse are +inf (rows that see nothing)
        lse_error = np.where(lse == tiled_lse, 0.0, lse - tiled_lse)
    errors = {"out": out - tiled_out, "lse": lse_error}
    errors.update({name: ours - ref for name, ours, ref in zip(("dq", "dk", "dv"), tiled_grads, grads)})
    return {name: float(np.max(np.abs(error))) if error.size else 0.0 for name, error in errors.items()}


CPU_TOLERANCE = 1e-12
