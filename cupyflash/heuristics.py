"""Default configs when nothing is tuned: one table per pass, a reason beside each row.

Rows are tried top to bottom for the compiled head dim; the first that fits the device's
shared-memory opt-in limit wins (so an sm_86 with 99 KB gets a smaller tile than an H100 with
227 KB). `cupyflash autotune` replaces these per problem bucket with measured winners.
"""

from __future__ import annotations

from .config import BwdConfig, DkdvConfig, TileConfig
from .device import DeviceLimits

# (largest head dim, config, why)
FWD_TABLE: tuple[tuple[int, TileConfig, str], ...] = (
    (64, TileConfig(128, 64, 4, 2), "32 rows per warp halve the K/V shared-memory reads per MMA; 224 regs, no spill"),
    (64, TileConfig(64, 64, 4, 2), "small-smem fallback"),
    (128, TileConfig(128, 64, 8, 2), "16 rows per warp: 32 rows spill at head_dim 128 (ptxas, 88 bytes)"),
    (128, TileConfig(64, 64, 4, 2), "small-smem fallback"),
    (192, TileConfig(128, 64, 8, 2), "acc_o of 96 floats + S of 32 per thread stays under 255 regs"),
    (192, TileConfig(64, 32, 4, 2), "small-smem fallback"),
    (256, TileConfig(128, 64, 8, 2), "202 KB smem, 239 regs: one block per SM on Hopper"),
    (256, TileConfig(64, 32, 4, 2), "small-smem fallback"),
)

BWD_TABLE: tuple[tuple[int, BwdConfig, str], ...] = (
    (64, BwdConfig(DkdvConfig(64, 128, 8, 2, 1), TileConfig(128, 64, 8, 2)),
     "128 keys per block, 16 per warp; dQ by atomics"),
    (128, BwdConfig(DkdvConfig(64, 128, 8, 2, 1), TileConfig(128, 64, 8, 2)),
     "177 KB smem; dK+dV+S^T+dP^T = 192 floats per thread fit without spills"),
    (128, BwdConfig(DkdvConfig(64, 64, 4, 2, 1), TileConfig(64, 64, 4, 2)), "small-smem fallback"),
    (192, BwdConfig(DkdvConfig(64, 64, 8, 2, 2), TileConfig(64, 64, 4, 2)),
     "warps split head_dim in two so dK, dV fit in registers"),
    (256, BwdConfig(DkdvConfig(64, 64, 8, 2, 2), TileConfig(64, 64, 4, 2), dq_atomic=False),
     "217 KB smem; the dQ-atomic variant spills 16 bytes, so dQ gets its own pass"),
)


def _first_fitting(table, head_dim: int, limits: DeviceLimits, fits):
    for max_dim, config, _why in table:
        if head_dim <= max_dim and fits(config):
            return config
    raise RuntimeError(f"no built-in config for head_dim {head_dim} fits {limits.name} "
                       f"({limits.smem_per_block_optin} bytes of shared memory per block)")


def default_fwd_config(head_dim: int, limits: DeviceLimits) -> TileConfig:
    return _first_fitting(FWD_TABLE, head_dim, limits, lambda c: c.fits(head_dim, limits))


def default_bwd_config(head_dim: int, limits: DeviceLimits) -> BwdConfig:
    return _first_fitting(BWD_TABLE, head_dim, limits, lambda c: c.fits(head_dim, limits))
