"""The mma.sync forward kernel (kernels_cu/flash_fwd.cu): sm_80 and up; on sm_90 it runs head dims
up to 32, and packed batches (varlen) at head dims that are not whole 64-column slabs (96, 160).

Each warp owns block_m / num_warps query rows (16 or 32); K/V tiles of block_n keys stream
through `stages` shared-memory slots. Shared memory is FwdSmem (traits.cuh): Q, then `stages`
K and V tiles, every row padded by SMEM_PAD elements.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Any

from .. import build
from ..device import DeviceLimits
from ..problem import Problem
from .common import defines, first_fitting, padded_row_bytes, pipeline_and_dim_problems, Variant

SOURCE, ENTRY = "flash_fwd.cu", "flash_fwd"
# Accumulator floats per thread above which a tile is not worth compiling: ptxas spills the
# forward (and the dQ kernel, which shares its tile shape) past about 160.
MAX_ACC_FLOATS = 160


@dataclass(frozen=True)
class RowTileConfig:
    """The tile shape of RowTraits (traits.cuh), which this kernel shares with the dQ kernel
    (flash_bwd_dq.py): each warp owns 16 or 32 rows of block_m, K/V tiles of block_n keys
    stream through `stages` slots. Subclasses give the kernel and its shared memory."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int = 2

    kernel = ""  # the family's entry point, which names it in to_dict (tuning files)

    @property
    def m_tiles(self) -> int:
        return self.block_m // (16 * self.num_warps)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def problems(self, head_dim: int) -> list[str]:
        """Why this config cannot be compiled for head_dim (empty when it can)."""
        reasons = []
        if self.block_m % (16 * self.num_warps) or self.m_tiles not in (1, 2):
            reasons.append(f"block_m {self.block_m} must be 16 or 32 rows per warp for {self.num_warps} warps")
        if self.block_n % 16:
            reasons.append(f"block_n {self.block_n} must be a multiple of 16")
        return reasons + pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """fp32 accumulator registers per thread: O (or dQ) plus one S tile."""
        return self.m_tiles * (head_dim + self.block_n) // 2

    def smem_bytes(self, head_dim: int) -> int:
        raise NotImplementedError

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return (not self.problems(head_dim) and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
                and self.acc_floats(head_dim) <= MAX_ACC_FLOATS and self.threads <= 1024)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}


@dataclass(frozen=True)
class FwdConfig(RowTileConfig):
    kernel = ENTRY

    def smem_bytes(self, head_dim: int) -> int:
        """FwdSmem: Q + stages x (K, V), padded rows."""
        return (self.block_m + 2 * self.stages * self.block_n) * padded_row_bytes(head_dim)


CONFIG = FwdConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)  # one spec per variant, built once
def spec(dtype: str, head_dim: int, cfg: FwdConfig, *, variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, smem_bytes=cfg.smem_bytes(head_dim), **variant.mask_defines()))


def grid(p: Problem, cfg: FwdConfig) -> tuple[int, int, int]:
    """One block per block_m query rows of each (head, batch)."""
    return (-(-p.seqlen_q // cfg.block_m), p.heads_q, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[FwdConfig]:
    """Every config worth timing for head_dim on this device."""
    space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    return [c for c in (FwdConfig(*values) for values in space) if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins): rows are tried top to bottom, the first that fits the
# device is the default. TFLOP/s: `cupyflash autotune --dtype float16` on an H100 80GB HBM3
# (2026-11-23, source 58fbb81a), paper grid (batch * seqlen = 16384, heads * head_dim = 2048).
TABLE: tuple[tuple[int, FwdConfig, str], ...] = (
    (64, FwdConfig(128, 64, 4, 2), "H100 winner or within 1%: 267-288 TFLOP/s; 32 rows per warp, 54 KB"),
    (128, FwdConfig(128, 32, 4, 2), "H100: 250-313 TFLOP/s against 204-245 for 128x64 on 8 warps; 68 KB"),
    (192, FwdConfig(128, 64, 8, 2), "acc_o 96 + S 32 floats per thread; 196 regs, 150 KB"),
    (256, FwdConfig(128, 64, 8, 2), "239 regs, 198 KB: one block per SM on Hopper"),
    (256, FwdConfig(128, 32, 8, 2), "A100 (163 KB per block): 132 KB"),
    (256, FwdConfig(64, 32, 4, 2), "sm_86/89 (99 KB per block): 99 KB"),
)


def default(head_dim: int, limits: DeviceLimits) -> FwdConfig | None:
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
