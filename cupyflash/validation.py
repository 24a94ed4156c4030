"""The validation matrix: the kernels against the float64 reference with the tolerance rule,
and, without a GPU, the tiled NumPy algorithm against the naive one. Used by the GPU tests,
`cupyflash validate` and scripts.

    from cupyflash import validation
    for case in validation.gpu_matrix(quick=True):
        for result in validation.run_gpu_case(case):
            print(result.message() if not result.ok else f"{case.id} {result.name} ok")

Variable-length (packed, cu_seqlens) batches have their own cases: varlen_matrix() with
run_varlen_gpu_case() on a GPU, cpu_varlen_matrix() with run_cpu_varlen_case() without one.
Each sequence is judged on its own, against the float64 reference of that sequence alone.
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
    with np.errstate(invalid="ignore"):  # inf - inf where both lse are -inf (rows that see nothing)
        lse_error = np.where(lse == tiled_lse, 0.0, lse - tiled_lse)
    errors = {"out": out - tiled_out, "lse": lse_error}
    errors.update({name: ours - ref for name, ours, ref in zip(("dq", "dk", "dv"), tiled_grads, grads)})
    return {name: float(np.max(np.abs(error))) if error.size else 0.0 for name, error in errors.items()}


CPU_TOLERANCE = 1e-12


# --- variable-length batches: packed (total, heads, head_dim) tensors and cu_seqlens ---
#
# Sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1] of the packed tensors and must equal
# the dense attention of that sequence alone (causal and windows bottom-right aligned per
# sequence). Every length set holds an empty sequence, a single token and one longer than a
# 128-row tile, in different places, with the key lengths equal to, shorter and longer than
# the query lengths.
VARLEN_LENGTHS = (((0, 1, 203), (0, 1, 203)),  # self-attention; the empty sequence first
                  ((1, 7, 300), (0, 1, 129)),  # seqlen_k 0 (rows see nothing); Sq > Sk
                  ((150, 0, 1), (333, 5, 64)))  # seqlen_q 0 with keys (zero dK, dV); Sq < Sk
VARLEN_HEAD_DIMS = (64, 128, 37)  # 37: odd, zero-padded to 40 inside
QUICK_VARLEN_DIMS_GROUPS = ((128, 4), (37, 1))  # (head_dim, group) pairs of the quick matrix


def cu_seqlens(lengths: Any) -> np.ndarray:
    """int32 (len(lengths) + 1,) offsets of the sequences in the packed tensors: 0, then the
    running sum of the lengths (non-negative integers, at most 2^31 - 1 tokens in all)."""
    counts = [int(n) for n in lengths]
    if any(n < 0 for n in counts) or any(int(n) != n for n in lengths):
        raise ValueError(f"lengths are {tuple(lengths)}; every length must be a non-negative integer")
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"lengths add up to {offsets[-1]} tokens; cu_seqlens is int32, at most 2^31 - 1")
    return offsets.astype(np.int32)


@dataclass(frozen=True)
class VarlenCase:
    dtype: str
    head_dim: int
    causal: bool
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    group: int = 1  # heads_q / heads_kv
    heads_kv: int = 2
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        parts = ["varlen", self.dtype, f"d{self.head_dim}", "causal" if self.causal else "full",
                 "q" + ",".join(map(str, self.lengths_q)), "k" + ",".join(map(str, self.lengths_k)), f"g{self.group}"]
        if self.window != (-1, -1):
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        return "-".join(parts)

    def packed(self) -> Any:
        """This batch as a packed_cases.PackedCase, which every packed check runs through."""
        from .packed_cases import PackedCase  # (packed_cases builds on this module)

        return PackedCase(self.dtype, self.head_dim, self.causal, self.lengths_q, self.lengths_k, group=self.group,
                          heads_kv=self.heads_kv, window=self.window)


def varlen_matrix(quick: bool = False) -> list[VarlenCase]:
    """dtypes x causal x VARLEN_LENGTHS x (head dims x GQA: a few pairs when quick), plus a window."""
    dims_groups = QUICK_VARLEN_DIMS_GROUPS if quick else tuple(itertools.product(VARLEN_HEAD_DIMS, (1, 4)))
    cases = [VarlenCase(dtype, d, causal, lq, lk, group)
             for dtype, causal, (lq, lk), (d, group) in itertools.product(
                 ("float16", "bfloat16"), (False, True), VARLEN_LENGTHS, dims_groups)]
    if not quick:
        cases.append(VarlenCase("float16", 64, False, *VARLEN_LENGTHS[0], window=(16, 4)))
    return cases


def sequence_bounds(lengths_q: Any, lengths_k: Any) -> list[tuple[slice, slice]]:
    """(query rows, key rows) of each sequence in the packed tensors."""
    if len(lengths_q) != len(lengths_k):
        raise ValueError(f"{len(lengths_q)} query lengths but {len(lengths_k)} key lengths; one of each per sequence")
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    return [(slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1])))
            for b in range(len(lengths_q))]


def sequence_reference(packed: dict[str, Any], rows: slice, keys: slice, *, backward: bool, xp: ModuleType = np,
                       compute_dtype: Any = None, **options: Any) -> dict[str, Any]:
    """reference.py on one sequence alone: out (L_q, Hq, D) and lse (Hq, L_q), and with
    backward dq (L_q, Hq, D), dk, dv (L_k, Hkv, D). packed: q, k, v, dout (total, H, D)."""
    q, dout = (packed[n][rows][None] for n in ("q", "dout"))
    k, v = (packed[n][keys][None] for n in ("k", "v"))
    out, lse = reference.attention_forward(q, k, v, xp=xp, compute_dtype=compute_dtype, **options)
    result = {"out": out[0], "lse": lse[0]}
    if backward:
        grads = reference.attention_backward(dout, q, k, v, xp=xp, compute_dtype=compute_dtype, **options)
        result.update((name, g[0]) for name, g in zip(("dq", "dk", "dv"), grads))
    return result


def run_varlen_gpu_case(case: VarlenCase, *, backward: bool = True, deterministic: bool = False,
                        seed: int = 0) -> list[Comparison]:
    """Runs attention_varlen (and attention_varlen_backward) on one case; returns one
    comparison per sequence and non-empty tensor, named "<tensor>@s<sequence>" (out, lse, dq,
    dk, dv), each against the float64 reference of that sequence alone. Outputs land in
    NaN-poisoned pool blocks, so rows the kernels leave unwritten fail."""
    from . import packed_cases

    packed = case.packed()
    host = packed_cases.varlen_inputs(packed, seed)
    ours = packed_cases.varlen_calls(packed, packed_cases.varlen_to_device(packed, host), backward=backward,
                                     deterministic=deterministic, poison=True)
    references = packed_cases.varlen_references(packed, host, backward)
    return packed_cases.compare_varlen(packed, {name: array.get() for name, array in ours.items()}, references,
                                       name_of=lambda name, b: f"{name}@s{b}")


# --- without a GPU: the tiled algorithm per sequence against a block-diagonal masked attention ---

@dataclass(frozen=True)
class VarlenCpuCase:
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    block_m: int
    block_n: int
    causal: bool
    group: int = 1
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else ("window" if self.window != (-1, -1) else "full")
        return (f"varlen-q{','.join(map(str, self.lengths_q))}-k{','.join(map(str, self.lengths_k))}"
                f"-blocks{self.block_m}x{self.block_n}-{mask}-g{self.group}")


def cpu_varlen_matrix(quick: bool = False) -> list[VarlenCpuCase]:
    blocks = ((16, 32),) if quick else ((16, 32), (3, 5))
    cases = [VarlenCpuCase(lq, lk, bm, bn, causal, 2)
             for (lq, lk), (bm, bn), causal in itertools.product(VARLEN_LENGTHS, blocks, (False, True))]
    return cases + [VarlenCpuCase(*VARLEN_LENGTHS[1], 16, 32, False, window=(20, 5))]


def block_diagonal_mask(lengths_q: Any, lengths_k: Any, causal: bool = False,
                        window_size: tuple[int, int] = (-1, -1)) -> np.ndarray:
    """(total_q, total_k) bool: packed query t sees packed key u iff both belong to one
    sequence and reference.visible_mask of that sequence lets its query see its key."""
    mask = np.zeros((sum(lengths_q), sum(lengths_k)), dtype=bool)
    for (rows, keys), sq, sk in zip(sequence_bounds(lengths_q, lengths_k), lengths_q, lengths_k):
        mask[rows, keys] = reference.visible_mask(sq, sk, causal, window_size)
    return mask


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray,
                     mask: np.ndarray) -> dict[str, np.ndarray]:
    """Naive attention over the whole packed token axis with a boolean (total_q, total_k)
    visibility mask, float64, forward and analytic backward: varlen written without cutting
    the batch into sequences. q, dout (total_q, Hq, D), k, v (total_k, Hkv, D) -> out, dq
    (total_q, Hq, D), lse (Hq, total_q) (-inf where a row sees nothing), dk, dv (total_k, Hkv, D)."""
    heads_kv, group = k.shape[1], q.shape[1] // k.shape[1]
    scale = reference.default_softmax_scale(q.shape[2])
    kh, vh = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.where(mask[None], np.einsum("qhd,khd->hqk", q, kh) * scale, -np.inf)
    m = s.max(axis=2, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe[..., None])
    total = p.sum(axis=2)
    p /= np.where(total > 0, total, 1.0)[..., None]
    out = np.einsum("hqk,khd->qhd", p, vh)
    ds = p * (np.einsum("qhd,khd->hqk", dout, vh) - np.einsum("qhd,qhd->hq", dout, out)[..., None])

    def per_kv_head(g: np.ndarray) -> np.ndarray:  # (total_k, Hq, D) summed over each kv head's q heads
        return g.reshape(g.shape[0], heads_kv, group, g.shape[2]).sum(axis=2)

    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, m_safe + np.log(total), -np.inf)
    return {"out": out, "lse": lse, "dq": np.einsum("hqk,khd->qhd", ds, kh) * scale,
            "dk": per_kv_head(np.einsum("hqk,qhd->khd", ds, q) * scale),
            "dv": per_kv_head(np.einsum("hqk,qhd->khd", p, dout))}


def _empty_results(q: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
    """Packed float64 results to fill: zeros, and lse -inf (what a row that sees nothing gets)."""
    return {"out": np.zeros(q.shape), "lse": np.full((q.shape[1], q.shape[0]), -np.inf), "dq": np.zeros(q.shape),
            "dk": np.zeros(k.shape), "dv": np.zeros(k.shape)}


def _write_sequence(packed: dict[str, np.ndarray], rows: slice, keys: slice, results: dict[str, Any]) -> None:
    """One sequence's out, lse, dq, dk, dv (batch axis dropped) into packed results."""
    packed["out"][rows], packed["lse"][:, rows], packed["dq"][rows] = results["out"], results["lse"], results["dq"]
    packed["dk"][keys], packed["dv"][keys] = results["dk"], results["dv"]


def tiled_varlen(packed: dict[str, np.ndarray], lengths_q: Any, lengths_k: Any, *, block_m: int, block_n: int,
                 **options: Any) -> dict[str, np.ndarray]:
    """reference_tiled on each sequence alone, written into packed results (as masked_attention's)."""
    result = _empty_results(packed["q"], packed["k"])
    for rows, keys in sequence_bounds(lengths_q, lengths_k):
        q, dout = packed["q"][rows][None], packed["dout"][rows][None]
        k, v = packed["k"][keys][None], packed["v"][keys][None]
        out, lse = reference_tiled.flash_forward(q, k, v, block_m=block_m, block_n=block_n, **options)
        grads = reference_tiled.flash_backward(dout, q, k, v, out, lse, block_m=block_m, block_n=block_n, **options)
        _write_sequence(result, rows, keys, {"out": out[0], "lse": lse[0], "dq": grads[0][0], "dk": grads[1][0],
                                             "dv": grads[2][0]})
    return result


def stitched_reference(packed: dict[str, np.ndarray], lengths_q: Any, lengths_k: Any,
                       **options: Any) -> dict[str, np.ndarray]:
    """sequence_reference of every sequence in float64 (what run_varlen_gpu_case judges
    against), written into packed results (as masked_attention's)."""
    result = _empty_results(packed["q"], packed["k"])
    for rows, keys in sequence_bounds(lengths_q, lengths_k):
        _write_sequence(result, rows, keys, sequence_reference(packed, rows, keys, backward=True, **options))
    return result


def run_cpu_varlen_case(case: VarlenCpuCase, seed: int = 0) -> dict[str, float]:
    """Max |per sequence - block-diagonal| for out, lse, dq, dk, dv in float64 (all should be
    ~1e-15), the worse of two per-sequence computations: the tiled algorithm (reference_tiled,
    the kernels' blueprint) and the stitched reference.py the GPU cases are judged against;
    the block-diagonal one is masked_attention over the packed tokens."""
    rng = np.random.default_rng(seed)
    heads_kv, head_dim = 1, 16
    total_q, total_k = sum(case.lengths_q), sum(case.lengths_k)
    packed = {"q": rng.standard_normal((total_q, heads_kv * case.group, head_dim)),
              "k": rng.standard_normal((total_k, heads_kv, head_dim)),
              "v": rng.standard_normal((total_k, heads_kv, head_dim))}
    packed["dout"] = rng.standard_normal(packed["q"].shape)
    opts = dict(causal=case.causal, window_size=case.window)
    mask = block_diagonal_mask(case.lengths_q, case.lengths_k, **opts)
    naive = masked_attention(packed["q"], packed["k"], packed["v"], packed["dout"], mask)
    tiled = tiled_varlen(packed, case.lengths_q, case.lengths_k, block_m=case.block_m, block_n=case.block_n, **opts)
    stitched = stitched_reference(packed, case.lengths_q, case.lengths_k, **opts)
    return {name: max(_max_difference(tiled[name], naive[name]), _max_difference(stitched[name], naive[name]))
            for name in naive}


def _max_difference(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref|, equal infinities counting 0 (lse of rows that see nothing); 0 when empty."""
    with np.errstate(invalid="ignore"):
        error = np.where(ours == ref, 0.0, np.abs(ours - ref))
    return float(np.max(error)) if error.size else 0.0
