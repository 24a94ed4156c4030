"""The decoding kernels (kernels_cu/flash_decode.cu): flash_decode_append writes new keys and
values into the cache, flash_decode attends over it in num_splits key ranges, and
flash_decode_combine merges the ranges' float32 partials.

One config per call, chosen from the packed rows (seqlen_q * group_size: the query tokens times
the q heads of one kv head): 4 warps as 1 x 4, 2 x 2 or 4 x 1 (row warps x key warps), so a
block holds 16, 32 or 64 packed rows and the rest of its warps split each 64-key tile. Any
sm_80 or newer GPU runs it (mma.sync): decoding is bound by reading the cache, not by the
tensor cores. GPUs with 99 KB of shared memory per block (RTX 3090/4090, A10, L4) run head dims
up to 128; above that no block fits them yet, and the call says so. The K/V tiles come by
cp.async, or on sm_90, opt-in until one process has timed them against cp.async over the decode
grid, by bulk tensor copies (bulk_copies).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from typing import Any

from .. import build, settings, tma
from ..device import DeviceLimits
from ..launch import APPEND_THREADS, DECODE_BLOCK_N, DECODE_MAX_SPLITS, DECODE_WARPS, SMEM_ALIGN_SLACK
from .common import ELEMENT_BYTES, SMEM_PAD, Variant, defines, round_up

SOURCE = "flash_decode.cu"
APPEND_ENTRY, ENTRY, COMBINE_ENTRY = "flash_decode_append", "flash_decode", "flash_decode_combine"
THREADS = 32 * DECODE_WARPS
BLOCK_N = DECODE_BLOCK_N  # keys per tile: split_size is a multiple of it
KERNEL_HEAD_DIMS = (64, 96, 128, 192, 256)  # compiled head dims; a call runs the smallest that holds its own
MAX_SPLITS = DECODE_MAX_SPLITS  # the heuristic may go up to a full wave of one-kv-head blocks
# Split counts merged inside a thread-block cluster (CF_CLUSTER) on sm_90 and up: the portable
# cluster sizes. Other counts, and older GPUs, write partials for flash_decode_combine.
CLUSTER_SPLITS = (2, 4, 8)
# Bulk tensor copies of the K/V tiles (CF_KV_TMA) on sm_90 and up: the compiled head dims that
# take them (whole 64-column boxes, Q in registers) and the most stages a block gets. Calls use
# them only with bulk_copies_enabled: the kernel was written on 2026-12-07 without a GPU to run
# it on, so until a GPU run has passed the suite and the sanitizer with them and measured them
# against the cp.async copies, they stay opt-in (CUPYFLASH_DECODE_BULK_COPIES=1; the GPU tests and
# the memory sweep run both). Plans remember their copies: plan.clear() after changing it.
BULK_HEAD_DIMS = (64, 128)
MAX_BULK_STAGES = 8
bulk_copies_enabled = settings.decode_bulk_copies()


@dataclass(frozen=True)
class DecodeConfig:
    row_warps: int  # 1, 2 or 4; the other 4 / row_warps warps split the keys of a tile
    stages: int
    box_rows: int = 0  # K/V by bulk tensor copies (CF_KV_TMA) in boxes of this many keys; 0: cp.async

    @property
    def block_m(self) -> int:
        """Packed rows per block."""
        return 16 * self.row_warps

    @property
    def key_warps(self) -> int:
        return DECODE_WARPS // self.row_warps

    def smem_bytes(self, head_dim: int) -> int:
        """DecodeSmem: Q and the larger of the K/V pipeline and the merge scratch; with bulk copies
        the tiles unpadded on a 1024-byte boundary, then Q and a mbarrier per stage, the struct a
        multiple of 1024 bytes, and the slack the kernel aligns it with."""
        stride = head_dim + SMEM_PAD
        q = self.block_m * stride * ELEMENT_BYTES
        merge = 4 * (3 * self.key_warps * self.block_m + self.block_m + self.key_warps * self.block_m * head_dim)
        if not self.box_rows:
            return q + max(2 * self.stages * BLOCK_N * stride * ELEMENT_BYTES, merge)
        tiles = 2 * self.stages * BLOCK_N * head_dim * ELEMENT_BYTES
        return round_up(round_up(max(tiles, merge), 1024) + q + 8 * self.stages, 1024) + SMEM_ALIGN_SLACK

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return self.smem_bytes(head_dim) <= limits.smem_per_block_optin


def deeper_pipeline(cfg: DecodeConfig, head_dim: int, blocks: int, limits: DeviceLimits) -> DecodeConfig:
    """cfg with 4 stages where a grid of `blocks` blocks runs one per SM anyway (no more blocks
    than SMs) and the 4 stages fit: up to head dim 128 with fewer than 4 row warps. A short split's
    tiles are then all in flight at once: on an H200 (bf16, d 128, 1 x 4k keys, 16 splits) 15.6 ->
    14.4 us with 1 kv head, 18.8 -> 18.1 with 8 (benchmarks/results/h200-2026-12-04-decode-l2/)."""
    deeper = DecodeConfig(cfg.row_warps, 4)
    if cfg.stages == 3 and blocks <= limits.sm_count and deeper.fits(kernel_head_dim(head_dim), limits):
        return deeper
    return cfg


def box_rows(page_size: int, paged: bool) -> int:
    """Keys per bulk-copy box: a whole 64-key tile, or a page of 16 or 32 keys (a tile's boxes must
    each lie in one page); 0 where pages of page_size keys cannot be boxed (not a power of two,
    or under 16 keys)."""
    if not paged:
        return BLOCK_N
    if page_size < 16 or page_size & (page_size - 1):
        return 0
    return min(page_size, BLOCK_N)


def bulk_copies(cfg: DecodeConfig, head_dim: int, rows: int, blocks: int, limits: DeviceLimits) -> DecodeConfig:
    """cfg with its K/V tiles by bulk tensor copies in boxes of `rows` keys (box_rows) where they can
    be: sm_90 and up, a compiled head dim of BULK_HEAD_DIMS (whether calls take it is
    bulk_copies_enabled's, the caller's to check). It takes the most stages (up to
    MAX_BULK_STAGES) that keep the blocks resident as cfg's are: one per SM where the grid of
    `blocks` has no more than the SMs, else cfg's blocks per SM (the split count assumed them).
    The copy engine keeps every stage in flight for one issuing thread, and the unpadded tiles let
    more stages fit than the cp.async block's padded ones (at most 4)."""
    dim = kernel_head_dim(head_dim)
    if not (rows and dim in BULK_HEAD_DIMS and tuple(limits.compute_capability) >= (9, 0)):
        return cfg
    per_sm = 1 if blocks <= limits.sm_count else blocks_per_sm(cfg, dim, limits)
    for stages in range(MAX_BULK_STAGES, 1, -1):
        bulk = DecodeConfig(cfg.row_warps, stages, rows)
        if bulk.fits(dim, limits) and blocks_per_sm(bulk, dim, limits) >= per_sm:
            return bulk
    return cfg


def tensor_maps(k_cache: Any, v_cache: Any, cfg: DecodeConfig) -> list[tuple[str, tma.TiledMap]] | str:
    """The maps a bulk-copy config reads (DecodeTensorMaps): k_cache and v_cache, each boxed
    (1, box_rows, 1, 64) and 128-byte swizzled; or why one of them has none (the caller takes
    the cp.async copies)."""
    maps = []
    for name, array in (("k_cache", k_cache), ("v_cache", v_cache)):
        tmap = tma.describe(array, (1, cfg.box_rows, 1, 64), swizzle=128)
        if isinstance(tmap, str):
            return f"{name} with shape {array.shape} and strides {array.strides}: {tmap}"
        maps.append((name, tmap))
    return maps


def kernel_head_dim(head_dim: int) -> int:
    """The compiled head dim that runs a stored head dim (a multiple of 8, at most 256)."""
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def config(packed_rows: int, head_dim: int, limits: DeviceLimits) -> DecodeConfig | None:
    """The block for seqlen_q * group_size packed rows: as few row warps as hold them (up to 4),
    so the rest split the keys; 3 stages up to head dim 128 with fewer than 4 row warps where a
    block of them fits (two per SM on an H100), else 2. Head dim 256
    keeps one row warp (with 2 or 4, its 128 accumulator floats per thread spill on sm_80), and
    more packed rows take more blocks. None when no block fits the device's shared memory."""
    kernel_dim = kernel_head_dim(head_dim)
    row_warps = 1 if packed_rows <= 16 or kernel_dim > 192 else 2 if packed_rows <= 32 else 4
    for stages in ((3, 2) if kernel_dim <= 128 and row_warps < 4 else (2,)):
        cfg = DecodeConfig(row_warps, stages)
        if cfg.fits(kernel_dim, limits):
            return cfg
    return None


def cluster_size(num_splits: int, blocks: int, slots: int, limits: DeviceLimits) -> int:
    """num_splits when its splits merge inside a thread-block cluster, else 0 (flash_decode_combine):
    a count of CLUSTER_SPLITS on sm_90 and up, in a grid of blocks * num_splits blocks that fits
    in one wave of the slots resident at once (pairs), or in a quarter of it (clusters of 4 and 8).
    A cluster's blocks are placed together, on one GPC, which leaves SMs idle once the grid is
    more than a few clusters. Measured (bf16, d 128, one query token; scripts/decode_splits.py):
    - H200: batch 64 x 4k keys, 1 kv head, 4 splits (256 blocks of 264 slots) 62.9 us as clusters
      against 52.0 with the combine, 2 splits (128) 49.2 against 53.4; batch 16 x 4k, 8 kv heads,
      2 splits (256 blocks) 79.5 against 82.7, 4 splits (512) 93.0 against 87.0.
    - H100, 2026-12-07: 8 splits of batch 16 x 1 kv head (128 blocks, under half of 264 slots)
      lose as clusters at every cache length: 4k 31.9 us against 27.8 with the combine, 32k 140.8
      against 112.0, 128k 480.4 against 385.4. At batch 1 (8 or 64 blocks) the cluster still
      wins: 4k keys, 8 kv heads 17.3 against 19.9; 1 kv head 14.8 against 16.9. Pairs at batch
      16 x 8 kv heads (256 blocks) are even: 32k 735.5 against 733.0, 128k 2864 against 2876."""
    if num_splits not in CLUSTER_SPLITS or tuple(limits.compute_capability) < (9, 0):
        return 0
    wave = slots if num_splits == 2 else slots // 4
    return num_splits if blocks * num_splits <= wave else 0


def prefer_cluster(num_splits: int, blocks: int, slots: int, key_tiles: int, limits: DeviceLimits) -> int:
    """The heuristic's split count, or the largest cluster in its place where that is at least half
    of it, merges in a cluster, and the heuristic's splits are short (at most twice
    MIN_TILES_PER_SPLIT tiles): the combine launch saved outweighs the fewer splits only where
    each split's reading is short. On an H200 (bf16, d 128, 32/8 heads, 1 x 4k keys): 8 splits
    in a cluster 15.9 us, 16 with the combine 17.5; 4 tokens 16.6 against 18.8
    (scripts/decode_splits.py; benchmarks/results/h200-2026-12-04-decode-l2/). With 1 kv head
    (8/1) it is about even: 14.7 against 14.4. Longer splits lose by halving the blocks: H100,
    1 x 32k keys, 8 kv heads, 8 splits 73.7 us against 16 at 66.5 (both with the combine)."""
    largest = CLUSTER_SPLITS[-1]
    short = math.ceil(key_tiles / num_splits) <= 2 * MIN_TILES_PER_SPLIT
    if short and largest < num_splits <= 2 * largest and cluster_size(largest, blocks, slots, limits):
        return largest
    return num_splits


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: DecodeConfig, variant: Variant, cluster: int = 0) -> build.KernelSpec:
    """flash_decode for a compiled head dim; variant gives the window sides (causal is right = 0);
    cluster > 0: that many splits, merged in their cluster (cluster_size)."""
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, row_warps=cfg.row_warps, stages=cfg.stages, smem_bytes=cfg.smem_bytes(head_dim),
        window_left=variant.window_left, window_right=variant.window_right, cluster=cluster, kv_tma=cfg.box_rows))


@functools.lru_cache(maxsize=None)
def helper_spec(dtype: str, entry: str) -> build.KernelSpec:
    """flash_decode_append or flash_decode_combine: compiled with the smallest decode block (they
    do not use it, but the file's layout check needs one)."""
    cfg = DecodeConfig(1, 2)
    return build.KernelSpec(SOURCE, entry, defines(
        dtype, head_dim=64, row_warps=cfg.row_warps, stages=cfg.stages, smem_bytes=cfg.smem_bytes(64),
        window_left=False, window_right=False, cluster=0, kv_tma=0))


def m_tiles(packed_rows: int, cfg: DecodeConfig) -> int:
    return -(-packed_rows // cfg.block_m)


def grid(batch: int, heads_kv: int, packed_rows: int, num_splits: int, cfg: DecodeConfig) -> tuple[int, int, int]:
    """(kv head fastest, then m tile, then split; batch): flash_decode.cu's block order (with a
    cluster, split fastest: the kernel reads the order from CF_CLUSTER)."""
    return (heads_kv * m_tiles(packed_rows, cfg) * num_splits, batch, 1)


def append_grid(batch: int, seqlen_new: int, heads_kv: int, head_dim: int) -> tuple[int, int, int]:
    """One thread per 16-byte chunk of each new key (and its value)."""
    return (-(-(seqlen_new * heads_kv * (head_dim // 8)) // APPEND_THREADS), batch, 1)


def combine_grid(batch: int, seqlen_q: int, heads_q: int) -> tuple[int, int, int]:
    """One block per query row."""
    return (batch * seqlen_q * heads_q, 1, 1)



def blocks_per_sm(cfg: DecodeConfig, head_dim: int, limits: DeviceLimits) -> int:
    """Resident blocks per SM by shared memory (1 KB reserved per block), at most 8."""
    return max(1, min(8, limits.smem_per_sm // (cfg.smem_bytes(head_dim) + 1024)))


MIN_TILES_PER_SPLIT = 4


def most_splits(key_tiles: int, max_splits: int) -> int:
    """The most splits of key_tiles that keep MIN_TILES_PER_SPLIT tiles each (at least 1), up to
    max_splits."""
    return min(max_splits, max(1, key_tiles // MIN_TILES_PER_SPLIT))


def one_block_per_sm_splits(blocks: int, key_tiles: int, sm_count: int, max_splits: int = MAX_SPLITS) -> int:
    """The most splits (2 or more) whose grid keeps to one block per SM and fills at least 85% of
    the SMs, or 0 where there is none (choose_splits decides). Every SM then reads the same share
    of the keys through 4 stages (deeper_pipeline), where choose_splits' count over the resident
    slots puts a second block on some SMs only. Measured on an H100, 2026-12-07 (bf16, d 128,
    one query token, merged by the combine; benchmarks/results/h100-2026-12-07-wide-pv-decode-clusters/):
    batch 16 x 1 kv head, 8 splits against choose_splits' 14-16: 4k keys 27.7 us against 29.3,
    32k 112.0 against 119.2, 128k 382.8 against 391.3; batch 1 x 8 kv heads, 16 against 29: 32k
    66.5 against 70.4, 128k 200.7 against 208.0; batch 64 x 1 kv head, 2 against 4: 128k 1455.7
    against 1478.4, 32k 391.5 against 388.1."""
    if blocks == 0:
        return 0
    splits = min(most_splits(key_tiles, max_splits), sm_count // blocks)
    return splits if splits >= 2 and blocks * splits >= 0.85 * sm_count else 0


def choose_splits(blocks: int, key_tiles: int, slots: int, max_splits: int = MAX_SPLITS) -> int:
    """num_splits by wave efficiency (the heuristic FlashAttention-2 and -3 share): with blocks
    blocks before splitting and slots blocks resident at once, keep one split when the blocks
    nearly fill the GPU; else, of the split counts that change the tiles per split, take the
    smallest whose last wave is within 85% of the best one's fill. A split keeps at least
    MIN_TILES_PER_SPLIT key tiles: a block's fixed costs (Q, the pipeline's fill, the merge of
    its warps, its partial row) outweigh fuller waves below that. Measured on an H200
    (benchmarks/results/h200-2026-12-04-kvcache/decode_configs.log): one sequence of 32k keys over
    one kv head, 0.69 TB/s at 128 splits (4 tiles each) against 0.54 at 256; batch 1, 4k keys, 8 kv
    heads, 0.87 at 16 splits against 0.80 at 32."""
    if blocks == 0 or blocks >= 0.8 * slots or key_tiles <= 1:
        return 1
    limit = min(most_splits(key_tiles, max_splits), slots)
    efficiency = {}
    for splits in range(1, limit + 1):
        if splits > 1 and math.ceil(key_tiles / splits) == math.ceil(key_tiles / (splits - 1)):
            continue  # the same tiles per split as one fewer: no better
        waves = blocks * splits / slots
        efficiency[splits] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return next(s for s, e in efficiency.items() if e >= 0.85 * best)
