"""The Hopper dK/dV kernel (kernels_cu/flash_bwd_dkdv_sm90.cu): wgmma, sm_90 only, every compiled
head dim. Its shared tiles are 64, 128 or 256 columns wide (tile_dim): 96 runs in tiles of 128,
160 and 192 in tiles of 256, zero-filled by the copies.

Two warpgroups of 4 warps own 64 keys each (block_n 128); in tiles of 256 they share 64 keys
and split the columns (block_n 64). Q / dO tiles of block_m queries stream through `stages`
slots; tiles are 128-byte swizzled. dQ goes out by bulk reductions (cp.reduce.async.bulk) into a
float32 accumulator of 64 x 32 units (DqUnits, traits.cuh), which flash_bwd_prep.py's
flash_bwd_convert_dq_tiled turns into dq; by default only in tiles of up to 128 columns
(atomic_dq_by_default), else dQ comes from its own pass (flash_bwd_dq_sm90.py).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

from .. import build
from ..device import DeviceLimits
from ..launch import DQ_UNIT_COLS, DQ_UNIT_ROWS, SMEM_ALIGN_SLACK
from ..problem import Problem
from .common import ELEMENT_BYTES, HOPPER, defines, first_fitting, pipeline_and_dim_problems, round_up, Variant
from .flash_bwd_dkdv import MAX_ACC_FLOATS

SOURCE, ENTRY = "flash_bwd_dkdv_sm90.cu", "flash_bwd_dkdv_sm90"
CONVERT_ENTRY = "flash_bwd_convert_dq_tiled"
NUM_WARPS = 8  # two warpgroups; one compiles too, but spills with atomic dQ (ptxas, NVRTC 12.9)


def atomic_dq_by_default(head_dim: int) -> bool:
    """Whether this kernel adds dQ (bulk reductions) by default, or leaves it to the dQ pass
    (flash_bwd_dq_sm90). Adds it in tiles of up to 128 columns. In tiles of 256 (160, 192, 256) the
    two warpgroups split the columns and deal out dQ's pieces, and there the dQ pass was faster:
    H100, bf16, S 4096, 2026-12-07, backward 1.13x at 256, 1.25x at 192, 1.23x at 160 causal,
    against 0.90-0.96x at 96 and 128 and 1.02x at 64
    (benchmarks/results/h100-2026-12-07-wgmma-dq-pass/). On the H100 of 2026-11-23 its atomic dQ
    had beaten the mma.sync dQ pass by 6-45% everywhere (bwd-sweep-fp16.json)."""
    return tile_dim(head_dim) <= 128


def tile_dim(head_dim: int) -> int:
    """Columns of the shared tiles (Sm90DkdvTraits::kTileDim): whole 64-column slabs, and in tiles
    of 256 two warpgroups of whole slabs each, so 96 takes 128 and 160 and 192 take 256."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def dq_stage_cols(head_dim: int) -> int:
    """Columns of a 64 x 64 dQ piece staged at once (kDqStageCols): 32 where shared memory is short."""
    return 32 if tile_dim(head_dim) > 128 else 64


@dataclass(frozen=True)
class Sm90DkdvConfig:
    block_m: int  # 64 or 128 queries per Q / dO tile
    block_n: int  # 128 keys (64 per warpgroup), or 64 shared by both in tiles of 256 columns
    stages: int = 2

    kernel = ENTRY
    num_warps = NUM_WARPS

    @property
    def threads(self) -> int:
        return 32 * NUM_WARPS

    def problems(self, head_dim: int) -> list[str]:
        reasons = []
        block_n = 64 if tile_dim(head_dim) > 128 else 128
        if self.block_n != block_n:
            reasons.append(f"block_n must be {block_n} at head_dim {head_dim} (got {self.block_n})")
        if self.block_m not in (64, 128):
            reasons.append(f"block_m {self.block_m} must be 64 or 128")
        return reasons + pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """64 keys x (2 tile columns + 2 block_m) over 128 threads; tiles of 256 are split in two."""
        tile = tile_dim(head_dim)
        return (tile if tile <= 128 else tile // 2) + self.block_m

    def smem_bytes(self, head_dim: int) -> int:
        """Sm90DkdvSmem: K, V + stages x (Q, dO, lse_log2, delta) + dS^T, unpadded, and each
        warpgroup's dQ staging buffer; tiles of 256 add P^T on the next 1024-byte boundary
        (Sm90DkdvSplitSmem). Plus the alignment slack."""
        tiles = (2 * self.block_n + 2 * self.stages * self.block_m) * tile_dim(head_dim) * ELEMENT_BYTES
        stats = 2 * self.stages * self.block_m * 4
        dq_stage = 2 * 64 * dq_stage_cols(head_dim) * 4  # per warpgroup, 64 rows of float32
        size = tiles + self.block_n * self.block_m * ELEMENT_BYTES + stats + dq_stage
        if tile_dim(head_dim) > 128:
            size = round_up(size, 1024) + self.block_n * self.block_m * ELEMENT_BYTES
        return size + SMEM_ALIGN_SLACK

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return (limits.compute_capability == HOPPER and not self.problems(head_dim)
                and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
                and self.acc_floats(head_dim) <= MAX_ACC_FLOATS)

    def atomic_dq_by_default(self, head_dim: int) -> bool:
        return atomic_dq_by_default(head_dim)

    def dq_accum_shape(self, p: Problem) -> tuple[int, ...]:
        """DqUnits (traits.cuh) float32: [batch][heads_q][ceil(seqlen_q / 64)][kernel head dim / 32]
        [64][32]; a packed batch has [heads_q][unit rows][...], each sequence starting a unit of
        its own: ceil((total_q + 64 batch) / 64) unit rows hold them all (DqUnits::packed_unit_rows)."""
        if p.varlen:
            unit_rows = -(-(p.total_q + DQ_UNIT_ROWS * p.batch) // DQ_UNIT_ROWS)
            return (p.heads_q, unit_rows, p.kernel_head_dim // DQ_UNIT_COLS, DQ_UNIT_ROWS, DQ_UNIT_COLS)
        return (p.batch, p.heads_q, -(-p.seqlen_q // DQ_UNIT_ROWS), p.kernel_head_dim // DQ_UNIT_COLS,
                DQ_UNIT_ROWS, DQ_UNIT_COLS)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}


CONFIG = Sm90DkdvConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: Sm90DkdvConfig, accum_dq: bool, *,
         variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, num_warps=NUM_WARPS, stages=cfg.stages, accum_dq=accum_dq,
        smem_bytes=cfg.smem_bytes(head_dim), **variant.mask_defines()), arch_suffix="a")


def grid(p: Problem, cfg: Sm90DkdvConfig) -> tuple[int, int, int]:
    return (-(-p.seqlen_k // cfg.block_n), p.heads_kv, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[Sm90DkdvConfig]:
    # Q tiles of 128 with three stages spill with atomic dQ at head_dim 64 (ptxas, 255 regs).
    configs = [Sm90DkdvConfig(m, 128, s) for m, s in ((64, 2), (64, 3), (128, 2))]
    configs.append(Sm90DkdvConfig(64, 64, 2))  # head_dim 256 (columns split)
    return [c for c in configs if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins). H100 and H200, fp16, paper grid, S = 1024..8192,
# against the other tiles of this kernel and the mma.sync kernel's (bwd-sweep-fp16.json in
# benchmarks/results/h100-2026-11-23-wgmma-bwd; H200 figures from h200-2026-12-01).
TABLE: tuple[tuple[int, Sm90DkdvConfig, str], ...] = (
    (64, Sm90DkdvConfig(128, 128, 2), "Q tiles of 128, 163 KB: the best tile in all 8 cells; H200 209-343 TFLOP/s"),
    (128, Sm90DkdvConfig(64, 128, 3), "Q tiles of 64 (128 does not fit), three stages, 211 KB: the best tile in "
                                      "all 8 cells; H200 267-405 TFLOP/s"),
    (256, Sm90DkdvConfig(64, 64, 2), "warpgroups share 64 keys and split head_dim; 235 regs, 226 KB: H200 "
                                     "1.15-1.41x FA2, where the mma.sync kernel was 0.67-0.77x on the H100"),
)


# The head dims this family is the default for. 96 (and 80 on it), 160 and 192 run in tiles
# wider than the head dim, 32 in tiles of 64; H100, 2026-12-07, bf16, S 4096, paper-grid heads,
# against the mma.sync kernel in the same process (benchmarks/results/h100-2026-12-07-wgmma-dkdv-default/):
# 1.78-1.87x at 80 and 96, 1.30-1.35x at 160, 1.50-1.52x at 192, 1.09-1.10x at 32, with racecheck
# and synccheck clean on the 96 and 160 builds and racecheck on the 32 one
# (benchmarks/results/h100-2026-12-07-wgmma-dq-pass/run1/sanitize-d32.log).
DEFAULT_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)


def table_config(head_dim: int, limits: DeviceLimits) -> Sm90DkdvConfig | None:
    """TABLE's config for head_dim on this device, whether or not it is the default there."""
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))


def default(head_dim: int, limits: DeviceLimits) -> Sm90DkdvConfig | None:
    return table_config(head_dim, limits) if head_dim in DEFAULT_HEAD_DIMS else None
