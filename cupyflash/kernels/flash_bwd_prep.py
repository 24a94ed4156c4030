"""The small backward kernels (kernels_cu/flash_bwd_prep.cu), which have no tile config:
flash_bwd_zero_unused_keys (packed batches: dK, dV of keys no sequence uses are 0), flash_bwd_delta
(delta = rowsum(dout * out) and lse_log2 = lse * log2(e), before dK/dV) and the two dQ conversions
after it (dq = softmax_scale * dq_accum in the 16-bit type), one per dK/dV kernel's accumulator
layout."""

from __future__ import annotations

import functools

from .. import build
from ..launch import CONVERT_CHUNK, CONVERT_THREADS, DELTA_ROWS, DELTA_THREADS, ZERO_BLOCKS_PER_GAP, ZERO_THREADS
from ..problem import Problem
from .common import Variant, defines

SOURCE = "flash_bwd_prep.cu"
ZERO_UNUSED_KEYS, DELTA = "flash_bwd_zero_unused_keys", "flash_bwd_delta"
CONVERT_DQ, CONVERT_DQ_TILED = "flash_bwd_convert_dq", "flash_bwd_convert_dq_tiled"
ENTRIES = (ZERO_UNUSED_KEYS, DELTA, CONVERT_DQ, CONVERT_DQ_TILED)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, entry: str, *, variant: Variant) -> build.KernelSpec:
    if entry not in ENTRIES:
        raise ValueError(f"entry {entry!r} is not a kernel of {SOURCE}; its kernels are {ENTRIES}")
    return build.KernelSpec(SOURCE, entry, defines(dtype, **variant.sequence_defines()))


def threads(entry: str) -> int:
    return {ZERO_UNUSED_KEYS: ZERO_THREADS, DELTA: DELTA_THREADS}.get(entry, CONVERT_THREADS)


def grid(p: Problem, entry: str) -> tuple[int, int, int]:
    """zero_unused_keys: ZERO_BLOCKS_PER_GAP blocks per run of unused keys, one after each packed
    sequence's slot and one after the last. delta: DELTA_ROWS query rows per block of each
    (head, batch). convert_dq: one thread per CONVERT_CHUNK elements of the contiguous dq.
    convert_dq_tiled: one block row per query row, blocks across (heads_q, head_dim / 4), one z
    per batch."""
    if entry == ZERO_UNUSED_KEYS:
        return (ZERO_BLOCKS_PER_GAP, p.batch + 1, 1)
    if entry == DELTA:
        return (-(-p.seqlen_q // DELTA_ROWS), p.heads_q, p.batch)
    if entry == CONVERT_DQ:
        n_elements = p.query_rows * p.heads_q * p.stored_head_dim
        return (-(-n_elements // (CONVERT_CHUNK * CONVERT_THREADS)), 1, 1)
    return (p.seqlen_q, -(-(p.heads_q * p.stored_head_dim // 4) // CONVERT_THREADS), p.batch)
