"""The Hopper forward kernel (kernels_cu/flash_fwd_sm90.cu): wgmma, sm_90 only, head dims that
are multiples of 64 (64, 128, 192, 256).

Warpgroups of 4 warps own 64 query rows each, so block_m (64, 128 or 192) sets the warps. Tiles
are unpadded and 128-byte swizzled; shared memory is Sm90FwdSmem (traits.cuh) plus the slack
that aligns it to 1024 bytes.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Any

from .. import build
from ..device import DeviceLimits
from ..launch import SMEM_ALIGN_SLACK
from ..problem import Problem
from .common import ELEMENT_BYTES, HOPPER, defines, first_fitting, pipeline_and_dim_problems, Variant
from .flash_fwd import MAX_ACC_FLOATS

SOURCE, ENTRY = "flash_fwd_sm90.cu", "flash_fwd_sm90"
ROWS_PER_WARPGROUP = 64


@dataclass(frozen=True)
class WarpgroupRowConfig:
    """The tile shape of the Hopper kernels whose warpgroups own 64 query rows each (this one and
    the dQ pass, flash_bwd_dq_sm90.py): block_m sets the warps, K/V tiles of block_n keys stream
    through `stages` slots. Subclasses give the kernel, its rules and its shared memory."""

    block_m: int  # 64 per warpgroup
    block_n: int
    stages: int = 2

    kernel = ""  # the family's entry point, which names it in to_dict (tuning files)
    max_acc_floats = MAX_ACC_FLOATS  # accumulator floats per thread that compile without spills
    block_ms = (64, 128, 192)  # one to three warpgroups

    @property
    def num_warps(self) -> int:
        return 4 * self.block_m // ROWS_PER_WARPGROUP

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def problems(self, head_dim: int) -> list[str]:
        """Why this config cannot be compiled for head_dim (empty when it can)."""
        reasons = []
        if self.block_m not in self.block_ms:
            allowed = ", ".join(map(str, self.block_ms[:-1])) + f" or {self.block_ms[-1]}"
            reasons.append(f"block_m {self.block_m} must be {allowed} (64 rows per warpgroup)")
        if self.block_n not in (64, 128):
            reasons.append(f"block_n {self.block_n} must be 64 or 128")
        return reasons + self.head_dim_problems(head_dim) + pipeline_and_dim_problems(self.stages, head_dim)

    def head_dim_problems(self, head_dim: int) -> list[str]:
        """The family's own rule on head_dim, if it has one."""
        return []

    def acc_floats(self, head_dim: int) -> int:
        raise NotImplementedError

    def smem_bytes(self, head_dim: int) -> int:
        raise NotImplementedError

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return (limits.compute_capability == HOPPER and not self.problems(head_dim)
                and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
                and self.acc_floats(head_dim) <= self.max_acc_floats)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}


@dataclass(frozen=True)
class Sm90FwdConfig(WarpgroupRowConfig):
    kernel = ENTRY

    def head_dim_problems(self, head_dim: int) -> list[str]:
        return [f"head_dim {head_dim} must be a multiple of 64 (128-byte slabs)"] if head_dim % 64 else []

    def acc_floats(self, head_dim: int) -> int:
        """O (64 rows x head_dim) plus one S tile over the warpgroup's 128 threads."""
        return (head_dim + self.block_n) // 2

    def smem_bytes(self, head_dim: int) -> int:
        """Sm90FwdSmem: Q + stages x (K, V), unpadded, plus the alignment slack."""
        return (self.block_m + 2 * self.stages * self.block_n) * head_dim * ELEMENT_BYTES + SMEM_ALIGN_SLACK


CONFIG = Sm90FwdConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: Sm90FwdConfig, *, variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_n=cfg.block_n, num_warps=cfg.num_warps, stages=cfg.stages,
        smem_bytes=cfg.smem_bytes(head_dim), **variant.mask_defines()), arch_suffix="a")


def grid(p: Problem, cfg: Sm90FwdConfig) -> tuple[int, int, int]:
    return (-(-p.seqlen_q // cfg.block_m), p.heads_q, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[Sm90FwdConfig]:
    space = itertools.product((64, 128, 192), (64, 128), (2, 3))
    return [c for c in (Sm90FwdConfig(*values) for values in space) if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins). H100, fp16, paper grid, S = 512..8192, against the
# other tiles of this kernel (benchmarks/results/h100-2026-11-23-wgmma/wgmma-tile-sweep-fp16.json,
# confirmed by `cupyflash autotune`, autotune-all.log there).
TABLE: tuple[tuple[int, Sm90FwdConfig, str], ...] = (
    (64, Sm90FwdConfig(64, 128, 3), "one warpgroup, 105 KB: two blocks per SM; 164-361 TFLOP/s, autotune "
                                    "finds at most 6% more (stages 2, or block_n 64 causal)"),
    (128, Sm90FwdConfig(128, 128, 3), "two warpgroups, three stages, 225 KB: 152-439 TFLOP/s at S >= 1024; "
                                      "kept by autotune in every d128 bucket"),
    (256, Sm90FwdConfig(128, 64, 2), "d192 and d256; acc_o 128 + S 32 floats per thread at d256: 234 regs, "
                                     "193 KB; 284-465 TFLOP/s at S >= 1024; kept by autotune"),
)


def default(head_dim: int, limits: DeviceLimits) -> Sm90FwdConfig | None:
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
