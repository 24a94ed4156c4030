"""The Hopper forward with bulk tensor copies (kernels_cu/flash_fwd_tma.cu), the default forward
on sm_90 above head dim 32: a copy warpgroup feeding two computing warpgroups through mbarriers.
Fixed-length batches only (a packed batch runs on flash_fwd_sm90). Every compiled head dim: its
shared tiles hold whole 64-column slabs (tile_dim), so 96 and 160 take the shared memory of 128
and 192.

Its second kernel parameter holds the tensor maps of q, k and v (cupyflash/tma.py), which embed
their addresses: `tensor_maps` names what to encode, and launch.TensorMapParams re-encodes a
map when its array's pointer changes between calls.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Any

from .. import build, tma
from ..device import DeviceLimits
from ..launch import SMEM_ALIGN_SLACK
from ..problem import Problem
from .common import ELEMENT_BYTES, HOPPER, defines, first_fitting, pipeline_and_dim_problems, whole_slabs, Variant

SOURCE, ENTRY = "flash_fwd_tma.cu", "flash_fwd_tma"
ROWS_PER_WARPGROUP = 64
BOX_COLS = 64  # columns per box: one 128-byte swizzle span
MAP_ARRAYS = ("q", "k", "v")  # FwdTensorMaps' fields, in order
PACKED_BATCHES = False  # plan.py skips this family for attention_varlen


@dataclass(frozen=True)
class TmaFwdConfig:
    block_n: int
    stages: int = 2
    pingpong: bool = False  # the two computing warpgroups take turns to issue their MMAs
    consumers: int = 2  # computing warpgroups of 64 query rows (and one that copies)
    wide_pv: bool = False  # P V as one m64n(64 slabs) wgmma per k16 step, not one m64n64 per slab

    kernel = ENTRY

    @property
    def block_m(self) -> int:
        return ROWS_PER_WARPGROUP * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    def problems(self, head_dim: int) -> list[str]:
        reasons = []
        if self.block_n not in (64, 128):
            reasons.append(f"block_n {self.block_n} must be 64 or 128")
        if self.consumers not in (2, 3):
            reasons.append(f"consumers {self.consumers} must be 2 or 3 computing warpgroups")
        if self.pingpong and self.consumers != 2:
            reasons.append("pingpong (turn-taking) needs exactly 2 computing warpgroups")
        if self.consumers == 3 and tile_dim(head_dim) > 64:
            # O alone takes 64 of their 160 registers at 128 columns: the windowed build with
            # block_n 64 spilled 44 bytes (NVRTC 12.9, 2026-12-07)
            reasons.append(f"3 computing warpgroups only up to head_dim 64 (tiles of {tile_dim(head_dim)} columns)")
        return reasons + pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """O (64 rows x head_dim) and one S tile over a warpgroup's 128 threads; P (half that)
        waits beside them while its P V runs."""
        return (tile_dim(head_dim) + self.block_n) // 2

    def smem_bytes(self, head_dim: int) -> int:
        """TmaFwdSmem: Q + stages x (K, V), then 1 + 4 x stages mbarriers, plus the alignment slack."""
        tiles = (self.block_m + 2 * self.stages * self.block_n) * tile_dim(head_dim) * ELEMENT_BYTES
        return tiles + 8 * (1 + 4 * self.stages) + SMEM_ALIGN_SLACK

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        # setmaxnreg grants the computing threads 240 registers with two computing warpgroups,
        # 160 with three, and ptxas allocates the code after it within that count (it reports
        # the launch bound's 168 or 128 for the kernel). This estimate (O and S in fp32, P
        # packed, about 32 for the rest) is loose: the compile tests are the check that every
        # candidate fits without spilling.
        registers = 240 if self.consumers == 2 else 160
        return (limits.compute_capability == HOPPER and not self.problems(head_dim)
                and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
                and self.acc_floats(head_dim) + self.block_n // 4 <= registers - 32)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}


CONFIG = TmaFwdConfig  # the config class of this family (plan.config_from_dict)


def tile_dim(head_dim: int) -> int:
    """Columns of a shared tile: head_dim rounded up to whole 64-column (128-byte) slabs."""
    return whole_slabs(head_dim)


def unsupported(p: Problem) -> str | None:
    """Why this kernel cannot run a call, or None: a packed batch's boxes would reach into the
    next sequence's rows."""
    return "a packed (variable-length) batch" if p.varlen else None


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: TmaFwdConfig, *, variant: Variant) -> build.KernelSpec:
    if variant.varlen:
        raise ValueError("flash_fwd_tma has no variable-length variant")
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_n=cfg.block_n, stages=cfg.stages, consumers=cfg.consumers,
        pingpong=cfg.pingpong, wide_pv=cfg.wide_pv,
        smem_bytes=cfg.smem_bytes(head_dim),
        **variant.mask_defines()), arch_suffix="a")


def grid(p: Problem, cfg: TmaFwdConfig) -> tuple[int, int, int]:
    return (-(-p.seqlen_q // cfg.block_m), p.heads_q, p.batch)


def tensor_maps(p: Problem, t: dict[str, Any], cfg: TmaFwdConfig) -> list[tuple[str, tma.TiledMap]] | str:
    """(array name, map) for q, k, v: (batch, seqlen, heads, head_dim) arrays (in the map,
    innermost first) read in boxes of 64 columns by block_m (q) or block_n (k, v) rows of one
    head. The kernel's head dim may exceed the stored one: box columns past it read zeros. Or
    why one of them has no map (plan.py then runs the next family's kernel)."""
    boxes = {"q": cfg.block_m, "k": cfg.block_n, "v": cfg.block_n}
    maps = []
    for name in MAP_ARRAYS:
        array = t[name]
        tmap = tma.describe(array, (1, boxes[name], 1, BOX_COLS), swizzle=128)
        if isinstance(tmap, str):  # (kernel_ready arrays have 16-byte strides: not expected)
            return f"{name} with shape {array.shape} and strides {array.strides}: {tmap}"
        maps.append((name, tmap))
    return maps


def candidates(head_dim: int, limits: DeviceLimits) -> list[TmaFwdConfig]:
    space = itertools.product((64, 128), (2, 3, 4), (False, True), (2, 3), (False, True))
    return [c for c in (TmaFwdConfig(*values) for values in space) if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins). H100, 2026-12-07, scripts/fwd_variants.py: every candidate
# against flash_fwd_sm90's default and torch's cuDNN backend in one process, paper-grid batch and
# heads (benchmarks/results/h100-2026-12-07-tma-forward/). block_n 128 beats 64 wherever it fits.
TABLE: tuple[tuple[int, TmaFwdConfig, str], ...] = (
    (64, TmaFwdConfig(128, 3), "fp16 S 4k 459-460 TFLOP/s (turn-taking 427-433); bf16 causal S 16k 488 (s2 465, "
                               "turn-taking 462-471); flash_fwd_sm90 398 / 410"),
    (128, TmaFwdConfig(128, 2, pingpong=True), "bf16 S 8k 676 / causal 629 TFLOP/s, within 1% of s3 and of no "
                                               "turn-taking; fp16 causal S 1k 367 against 341 without it; "
                                               "flash_fwd_sm90 516 / 470 / 304; d96 (tile 128) 525"),
    (256, TmaFwdConfig(64, 2), "the one candidate from d160 up (shared memory); d160 574, d192 causal 560, d256 "
                               "causal 584 / fp16 637 TFLOP/s, turn-taking 1-3% slower; flash_fwd_sm90 308-493"),
)


# The compiled head dims this kernel has run on a GPU (tests/test_gpu_forward_tma.py, 2026-12-07):
# 32 has not, so head dims up to 32 keep the mma.sync forward until it has.
FIRST_DEFAULT_HEAD_DIM = 64


def default(head_dim: int, limits: DeviceLimits) -> TmaFwdConfig | None:
    if head_dim < FIRST_DEFAULT_HEAD_DIM:
        return None
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
