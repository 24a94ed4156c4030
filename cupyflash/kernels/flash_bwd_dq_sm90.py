"""The Hopper dQ pass (kernels_cu/flash_bwd_dq_sm90.cu): wgmma, sm_90 only, every compiled head
dim. deterministic=True runs it, and so does the default backward where the dK/dV kernel leaves
dQ out (flash_bwd_dkdv_sm90.atomic_dq_by_default). The shape of flash_fwd_sm90.py's kernel
(WarpgroupRowConfig): warpgroups of 4 warps own 64 query rows each, so block_m (64 or 128) sets
the warps; K/V tiles of block_n keys stream through `stages` slots. Shared tiles hold whole
64-column slabs (96 runs in tiles of 128, 160 in 192), unpadded and 128-byte swizzled:
Sm90DqSmem (flash_bwd_dq_sm90.cu) plus the alignment slack.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from .. import build
from ..device import DeviceLimits
from ..launch import SMEM_ALIGN_SLACK
from ..problem import Problem
from .common import ELEMENT_BYTES, defines, first_fitting, whole_slabs, Variant
from .flash_bwd_dkdv import MAX_ACC_FLOATS
from .flash_fwd_sm90 import WarpgroupRowConfig

SOURCE, ENTRY = "flash_bwd_dq_sm90.cu", "flash_bwd_dq_sm90"


@dataclass(frozen=True)
class Sm90DqConfig(WarpgroupRowConfig):
    kernel = ENTRY
    max_acc_floats = MAX_ACC_FLOATS  # the dK/dV kernels' bound: dQ and two score tiles at d256
    block_ms = (64, 128)  # one or two warpgroups

    def acc_floats(self, head_dim: int) -> int:
        """dQ (64 rows x tile columns) plus the S and dP tiles over the warpgroup's 128 threads."""
        return whole_slabs(head_dim) // 2 + self.block_n

    def smem_bytes(self, head_dim: int) -> int:
        """Sm90DqSmem: Q, dO + stages x (K, V), unpadded, plus the alignment slack."""
        rows = 2 * self.block_m + 2 * self.stages * self.block_n
        return rows * whole_slabs(head_dim) * ELEMENT_BYTES + SMEM_ALIGN_SLACK


CONFIG = Sm90DqConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: Sm90DqConfig, *, variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_n=cfg.block_n, num_warps=cfg.num_warps, stages=cfg.stages,
        smem_bytes=cfg.smem_bytes(head_dim), **variant.mask_defines()), arch_suffix="a")


def grid(p: Problem, cfg: Sm90DqConfig) -> tuple[int, int, int]:
    return (-(-p.seqlen_q // cfg.block_m), p.heads_q, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[Sm90DqConfig]:
    space = itertools.product((64, 128), (64, 128), (2, 3))
    return [c for c in (Sm90DqConfig(*values) for values in space) if c.fits(head_dim, limits)]


# (largest head dim, config, why). Not yet timed on a GPU: the forward's tiles (flash_fwd_sm90.py)
# where they fit; ptxas (NVRTC 12.9, bf16) reports no spills for any of them.
TABLE: tuple[tuple[int, Sm90DqConfig, str], ...] = (
    (128, Sm90DqConfig(128, 64, 2), "two warpgroups; dQ 64 + S, dP 64 floats per thread at d128: 177 regs, 129 KB"),
    (192, Sm90DqConfig(128, 64, 2), "d160 and d192 in tiles of 192: 192 regs, 193 KB"),
    (256, Sm90DqConfig(64, 64, 2), "one warpgroup (two do not fit 227 KB): dQ 128 + S, dP 64 floats per "
                                   "thread, 255 regs, 193 KB"),
)


def default(head_dim: int, limits: DeviceLimits) -> Sm90DqConfig | None:
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
