"""The merge kernel (kernels_cu/flash_merge.cu): results for the same query rows over disjoint
key sets, combined by their lse. No tile config: one warp per query row."""

from __future__ import annotations

import functools

from .. import build
from ..launch import MERGE_ROWS_PER_BLOCK, MERGE_THREADS
from .common import defines

SOURCE, ENTRY = "flash_merge.cu", "flash_merge"
THREADS = MERGE_THREADS


@functools.lru_cache(maxsize=None)
def spec(dtype: str) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(dtype))


def grid(batch: int, seqlen_q: int, heads_q: int) -> tuple[int, int, int]:
    """MERGE_ROWS_PER_BLOCK query rows (one per warp) per block."""
    return (-(-(batch * seqlen_q * heads_q) // MERGE_ROWS_PER_BLOCK), 1, 1)
