"""Default configs when nothing is tuned: one table per kernel, a reason beside each row.

Rows are tried top to bottom; the first whose head-dim bound covers the compiled head dim and
whose shared memory fits the device's opt-in limit wins. The fallbacks are sized for A100
(163 KB per block) and sm_86/89 (99 KB). `cupyflash autotune` replaces these per problem
bucket with measured winners. Register counts are ptxas's (NVRTC 12.9, sm_90); TFLOP/s are
`cupyflash autotune --dtype float16` on an H100 80GB HBM3, 2026-11-23 (source 58fbb81a), on
the paper grid's problems (batch * seqlen = 16384, heads * head_dim = 2048), S = 2048 / 8192.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

from .config import BwdConfig, DkdvConfig, TileConfig
from .device import DeviceLimits

Config = TypeVar("Config")

# (largest head dim, config, why)
FWD_TABLE: tuple[tuple[int, TileConfig, str], ...] = (
    # Hopper (wgmma; fits() admits these on sm_90 only, and head dims that are multiples of 64).
    # H100, fp16, paper grid, S = 512..8192, against the other wgmma tiles (2026-11-23; data in
    # benchmarks/results/h100-2026-11-23-wgmma/wgmma-tile-sweep-fp16.json, confirmed by autotune-all.log):
    (64, TileConfig(64, 128, 4, 3, wgmma=True), "one warpgroup, 105 KB: two blocks per SM; 164-361 TFLOP/s, "
                                                "autotune finds at most 6% more (stages 2, or block_n 64 causal)"),
    (128, TileConfig(128, 128, 8, 3, wgmma=True), "two warpgroups, three stages, 225 KB: 152-439 at S >= 1024; "
                                                  "kept by autotune in every d128 bucket"),
    (256, TileConfig(128, 64, 8, 2, wgmma=True), "d192 and d256; acc_o 128 + S 32 floats per thread at d256: "
                                                 "234 regs, 193 KB; 284-465 at S >= 1024; kept by autotune"),
    # mma.sync (sm_80 and up; on sm_90 the head dims wgmma does not cover: 32, 96, 160)
    (64, TileConfig(128, 64, 4, 2), "H100 winner or within 1%: 267-288 TFLOP/s; 32 rows per warp, 54 KB"),
    (128, TileConfig(128, 32, 4, 2), "H100: 250-313 TFLOP/s against 204-245 for 128x64 on 8 warps; 68 KB"),
    (192, TileConfig(128, 64, 8, 2), "acc_o 96 + S 32 floats per thread; 196 regs, 150 KB"),
    (256, TileConfig(128, 64, 8, 2), "239 regs, 198 KB: one block per SM on Hopper"),
    (256, TileConfig(128, 32, 8, 2), "A100 fallback, 132 KB"),
    (256, TileConfig(64, 32, 4, 2), "sm_86 fallback, 99 KB"),
)

DKDV_TABLE: tuple[tuple[int, DkdvConfig, str], ...] = (
    # Hopper (wgmma, flash_bwd_dkdv_sm90.cu; fits() admits these on sm_90 only, head dims 64, 128).
    # H100, fp16, paper grid, S = 1024..8192, against the other wgmma tiles and the mma.sync rows
    # below (2026-11-23, benchmarks/results/h100-2026-11-23-wgmma-bwd/bwd-sweep-fp16.json):
    # The kernel then moved dQ out by bulk reductions (2026-12-01), which added the 32 KB (16 KB at
    # d256) dQ staging buffers to each size below; H200 fp16 numbers from that kernel follow the H100 ones.
    (64, DkdvConfig(128, 128, 8, 2, 1, wgmma=True), "two warpgroups of 64 keys, Q tiles of 128, 163 KB: "
                                                    "195-333 TFLOP/s, the best tile in all 8 cells; H200 209-343"),
    (128, DkdvConfig(64, 128, 8, 3, 1, wgmma=True), "Q tiles of 64 (128 would not fit), three stages, 211 KB: "
                                                    "210-369 TFLOP/s, the best tile in all 8 cells; H200 267-405"),
    (256, DkdvConfig(64, 64, 8, 2, 1, wgmma=True), "both warpgroups share 64 keys and split head_dim; 235 "
                                                   "regs, 226 KB: 0.93-1.04x FA2 against 0.67-0.77x for "
                                                   "mma.sync (bwd-sweep-fp16-d256.json); H200 1.15-1.41x"),
    # mma.sync (sm_80 and up; on sm_90 the head dims wgmma does not cover)
    (64, DkdvConfig(32, 128, 4, 2, 1), "H100: 185-219 TFLOP/s against 150-182 for 64x128 on 8 warps; 75 KB"),
    (128, DkdvConfig(64, 128, 8, 2, 2), "H100: 178-216 TFLOP/s against 152-188 for 32x128 unsplit; 173 KB"),
    (128, DkdvConfig(64, 64, 4, 2, 1), "A100 fallback (121 KB at d128)"),
    (128, DkdvConfig(32, 64, 4, 2, 1), "sm_86 fallback (79 KB at d128)"),
    (256, DkdvConfig(64, 64, 8, 2, 2), "warps split head_dim in two so dK, dV fit in registers; 217 KB at d256"),
    (256, DkdvConfig(32, 64, 8, 2, 2), "A100 fallback (143 KB at d256)"),
    (192, DkdvConfig(32, 32, 4, 2, 2), "sm_86/89 fallback (81 KB at d192)"),
    (256, DkdvConfig(32, 16, 2, 2, 2), "sm_86/89 fallback (86 KB at d256): 16 keys, two warps splitting "
                                       "head_dim; 255 regs, no spills (ptxas, NVRTC 12.9, sm_89); slow, but "
                                       "the only d256 tile of this kernel that fits 99 KB"),
)

DQ_TABLE: tuple[tuple[int, TileConfig, str], ...] = (
    (128, TileConfig(128, 64, 8, 2), "the forward's tile shape; 207 regs at d128"),
    (128, TileConfig(64, 32, 4, 2), "sm_86 fallback"),
    (256, TileConfig(128, 32, 8, 2), "H100: 150-180 TFLOP/s backward against 148-171 with 64x64; 198 KB"),
    (256, TileConfig(64, 32, 4, 2), "A100 fallback (132 KB at d256)"),
    (192, TileConfig(64, 16, 4, 2), "sm_86/89 fallback (75 KB at d192)"),
    (256, TileConfig(64, 16, 4, 2), "sm_86/89 fallback (99 KB at d256, exactly the limit); 237 regs"),
)

# dQ by float32 atomics from the dK/dV kernel, or in its own pass. Measured on the H100: the
# wgmma dK/dV kernel with atomics (red.add then; bulk reductions since) beats its own-pass
# variant by 6-45% in every cell of the sweep above, so it always uses them. For mma.sync,
# atomics win at head_dim 64; at 128 the separate pass won 3 of 4 buckets (s2048 full and
# causal, s8192 causal); at 256 the atomic dK/dV variant spills. So there, above 64, dQ gets
# its own pass.
MAX_ATOMIC_DQ_HEAD_DIM = 64


def _first_fitting(table: tuple[tuple[int, Config, str], ...], what: str, head_dim: int, limits: DeviceLimits,
                   fits: Callable[[Config], bool]) -> Config:
    for max_dim, config, _why in table:
        if head_dim <= max_dim and fits(config):
            return config
    raise RuntimeError(f"no built-in {what} config for head_dim {head_dim} fits {limits.name} "
                       f"({limits.smem_per_block_optin} bytes of shared memory per block)")


@functools.lru_cache(maxsize=None)  # pure in its (hashable) arguments; called on every attention()
def default_fwd_config(head_dim: int, limits: DeviceLimits) -> TileConfig:
    return _first_fitting(FWD_TABLE, "forward", head_dim, limits, lambda c: c.fits(head_dim, limits))


@functools.lru_cache(maxsize=None)
def default_bwd_config(head_dim: int, limits: DeviceLimits) -> BwdConfig:
    dkdv = _first_fitting(DKDV_TABLE, "backward dK/dV", head_dim, limits, lambda c: c.fits(head_dim, limits))
    dq = _first_fitting(DQ_TABLE, "backward dQ", head_dim, limits, lambda c: c.fits(head_dim, limits, kind="dq"))
    return BwdConfig(dkdv, dq, dq_atomic=head_dim <= MAX_ATOMIC_DQ_HEAD_DIM or dkdv.wgmma)
