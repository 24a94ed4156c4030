"""Default configs when nothing is tuned: one table per kernel, a reason beside each row.

Rows are tried top to bottom; the first whose head-dim bound covers the compiled head dim and
whose shared memory fits the device's opt-in limit wins. The fallbacks are sized for A100
(163 KB per block) and sm_86/89 (99 KB). `cupyflash autotune` replaces these per problem
bucket with measured winners. Register counts are ptxas's (NVRTC 12.9, sm_90).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .config import BwdConfig, DkdvConfig, TileConfig
from .device import DeviceLimits

Config = TypeVar("Config")

# (largest head dim, config, why)
FWD_TABLE: tuple[tuple[int, TileConfig, str], ...] = (
    (64, TileConfig(128, 64, 4, 2), "32 rows per warp halve the K/V shared reads per MMA; 224 regs, 54 KB"),
    (128, TileConfig(128, 64, 8, 2), "16 rows per warp: 32 rows spill at head_dim 128; 162 regs, 102 KB"),
    (128, TileConfig(64, 64, 4, 2), "sm_86 fallback, 85 KB"),
    (192, TileConfig(128, 64, 8, 2), "acc_o 96 + S 32 floats per thread; 196 regs, 150 KB"),
    (256, TileConfig(128, 64, 8, 2), "239 regs, 198 KB: one block per SM on Hopper"),
    (256, TileConfig(128, 32, 8, 2), "A100 fallback, 132 KB"),
    (256, TileConfig(64, 32, 4, 2), "sm_86 fallback, 99 KB"),
)

DKDV_TABLE: tuple[tuple[int, DkdvConfig, str], ...] = (
    (64, DkdvConfig(64, 128, 8, 2, 1), "128 keys per block, 16 per warp; 207 regs at d64, 109 KB"),
    (128, DkdvConfig(32, 128, 8, 2, 1), "at d128 block_m 64 spills 24 bytes with dQ atomics; 227 regs, 122 KB"),
    (128, DkdvConfig(64, 64, 4, 2, 1), "A100 fallback (121 KB at d128)"),
    (128, DkdvConfig(32, 64, 4, 2, 1), "sm_86 fallback (79 KB at d128)"),
    (256, DkdvConfig(64, 64, 8, 2, 2), "warps split head_dim in two so dK, dV fit in registers; 217 KB at d256"),
    (256, DkdvConfig(32, 64, 8, 2, 2), "A100 fallback (143 KB at d256)"),
    (192, DkdvConfig(32, 32, 4, 2, 2), "sm_86 fallback (81 KB at d192); no d256 backward fits 99 KB"),
)

DQ_TABLE: tuple[tuple[int, TileConfig, str], ...] = (
    (128, TileConfig(128, 64, 8, 2), "the forward's tile shape; 207 regs at d128"),
    (128, TileConfig(64, 32, 4, 2), "sm_86 fallback"),
    (256, TileConfig(64, 64, 4, 2), "254 regs at d256, 198 KB"),
    (256, TileConfig(64, 32, 4, 2), "A100 fallback (132 KB at d256)"),
    (192, TileConfig(64, 16, 4, 2), "sm_86 fallback (75 KB at d192)"),
)

# dQ by float32 atomics from the dK/dV kernel, or in its own pass. At head_dim 256 the atomic
# variant of the dK/dV kernel spills (16 bytes), so dQ gets its own pass there.
MAX_ATOMIC_DQ_HEAD_DIM = 192


def _first_fitting(table: tuple[tuple[int, Config, str], ...], what: str, head_dim: int, limits: DeviceLimits,
                   fits: Callable[[Config], bool]) -> Config:
    for max_dim, config, _why in table:
        if head_dim <= max_dim and fits(config):
            return config
    raise RuntimeError(f"no built-in {what} config for head_dim {head_dim} fits {limits.name} "
                       f"({limits.smem_per_block_optin} bytes of shared memory per block)")


def default_fwd_config(head_dim: int, limits: DeviceLimits) -> TileConfig:
    return _first_fitting(FWD_TABLE, "forward", head_dim, limits, lambda c: c.fits(head_dim, limits))


def default_bwd_config(head_dim: int, limits: DeviceLimits) -> BwdConfig:
    dkdv = _first_fitting(DKDV_TABLE, "backward dK/dV", head_dim, limits, lambda c: c.fits(head_dim, limits))
    dq = _first_fitting(DQ_TABLE, "backward dQ", head_dim, limits, lambda c: c.fits(head_dim, limits, kind="dq"))
    return BwdConfig(dkdv, dq, dq_atomic=head_dim <= MAX_ATOMIC_DQ_HEAD_DIM)
