"""The deterministic dQ kernel (kernels_cu/flash_bwd_dq.cu): mma.sync, every architecture.

A block owns block_m query rows and walks the K/V tiles in a fixed order, keeping dQ in
registers: bitwise-repeatable, at the cost of recomputing S and dP. It has the forward's tile
shape (RowTraits: each warp owns 16 or 32 rows); shared memory is DqSmem (flash_bwd_dq.cu):
Q and dO, then `stages` K and V tiles, padded rows.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from .. import build
from ..device import DeviceLimits
from ..problem import Problem
from .common import defines, first_fitting, padded_row_bytes, Variant
from .flash_fwd import RowTileConfig

SOURCE, ENTRY = "flash_bwd_dq.cu", "flash_bwd_dq"


@dataclass(frozen=True)
class DqConfig(RowTileConfig):
    kernel = ENTRY

    def smem_bytes(self, head_dim: int) -> int:
        """DqSmem: Q, dO + stages x (K, V), padded rows."""
        return (2 * self.block_m + 2 * self.stages * self.block_n) * padded_row_bytes(head_dim)


CONFIG = DqConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: DqConfig, *, variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, smem_bytes=cfg.smem_bytes(head_dim), **variant.mask_defines()))


def grid(p: Problem, cfg: DqConfig) -> tuple[int, int, int]:
    return (-(-p.seqlen_q // cfg.block_m), p.heads_q, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[DqConfig]:
    space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2,))
    configs = [DqConfig(*values) for values in space]
    configs.append(DqConfig(64, 16, 4, 2))  # head_dim 192 and 256 on 99 KB GPUs (TABLE)
    return [c for c in configs if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins); H100 fp16 figures are of the whole backward pass.
TABLE: tuple[tuple[int, DqConfig, str], ...] = (
    (128, DqConfig(128, 64, 8, 2), "the forward's tile shape; 207 regs at d128"),
    (128, DqConfig(64, 32, 4, 2), "sm_86/89 (99 KB per block)"),
    (256, DqConfig(128, 32, 8, 2), "H100: 150-180 TFLOP/s backward against 148-171 with 64x64; 198 KB"),
    (256, DqConfig(64, 32, 4, 2), "A100 (163 KB per block): 132 KB at d256"),
    (192, DqConfig(64, 16, 4, 2), "sm_86/89: 75 KB at d192"),
    (256, DqConfig(64, 16, 4, 2), "sm_86/89: 99 KB at d256, exactly the limit; 237 regs"),
)


def default(head_dim: int, limits: DeviceLimits) -> DqConfig | None:
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
