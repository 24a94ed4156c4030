"""Kernel configurations: tile sizes, warps and pipeline depth, as frozen (hashable,
JSON-round-trippable) dataclasses, with the shared-memory arithmetic of the kernels' layouts
and a feasibility check against a device's limits.

``smem_bytes()`` mirrors the structs in kernels_cu/traits.cuh and the kernels; build.py passes
it to every compile as CF_SMEM_BYTES, where a static_assert checks that the two agree.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from .device import DeviceLimits

# Head dims with a compiled kernel; any other multiple of 8 runs on the next one up, with the
# extra columns zero-filled on load and skipped on store.
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
MAX_HEAD_DIM = KERNEL_HEAD_DIMS[-1]
SMEM_PAD = 8  # elements of padding per shared row (kSmemPad)
ELEMENT_BYTES = 2
# Accumulator floats per thread above which a tile is not worth compiling: measured with ptxas
# (kernels_cu), the forward spills past about 160 and the dK/dV kernel past about 200.
FWD_MAX_ACC_FLOATS = 160
BWD_MAX_ACC_FLOATS = 200
WGMMA_ALIGN_SLACK = 1024  # kSmemAlignSlack in flash_fwd_sm90.cu and flash_bwd_dkdv_sm90.cu


def sm90_dq_stage_cols(head_dim: int) -> int:
    """Columns of a 64 x 64 dQ piece the Hopper dK/dV kernel stages at once (kDqStageCols)."""
    return 32 if head_dim > 128 else 64


def kernel_head_dim(head_dim: int) -> int:
    """The compiled head dim that runs a problem of this head dim (head_dim <= 256)."""
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def _pipeline_and_dim_problems(stages: int, head_dim: int) -> list[str]:
    """The rules every kernel shares: double-buffered (or deeper) tiles, a compiled head dim."""
    reasons = [] if stages >= 2 else ["stages must be at least 2"]
    if head_dim not in KERNEL_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} has no kernel; compiled head dims are {KERNEL_HEAD_DIMS}")
    return reasons


def _row_bytes(head_dim: int) -> int:
    return (head_dim + SMEM_PAD) * ELEMENT_BYTES


@dataclass(frozen=True)
class TileConfig:
    """The forward kernel and the deterministic dQ kernel: each warp owns block_m / num_warps
    query rows (16 or 32); K/V tiles of block_n keys stream through `stages` slots.

    wgmma=True selects the Hopper forward (flash_fwd_sm90.cu, sm_90 only): warpgroups of 4 warps
    own 64 rows each (block_m = 16 * num_warps), on unpadded 128-byte-swizzled tiles."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int = 2
    wgmma: bool = False

    @property
    def m_tiles(self) -> int:
        return self.block_m // (16 * self.num_warps)

    def problems(self, head_dim: int) -> list[str]:
        """Why this config cannot be compiled for head_dim (empty when it can)."""
        if self.wgmma:
            return self._wgmma_problems(head_dim)
        reasons = []
        if self.block_m % (16 * self.num_warps) or self.m_tiles not in (1, 2):
            reasons.append(f"block_m {self.block_m} must be 16 or 32 rows per warp for {self.num_warps} warps")
        if self.block_n % 16:
            reasons.append(f"block_n {self.block_n} must be a multiple of 16")
        return reasons + _pipeline_and_dim_problems(self.stages, head_dim)

    def _wgmma_problems(self, head_dim: int) -> list[str]:
        reasons = []
        if self.num_warps not in (4, 8, 12) or self.block_m != 16 * self.num_warps:
            reasons.append(f"wgmma: num_warps must be 4, 8 or 12 and block_m 64 per warpgroup "
                           f"(block_m {self.block_m}, num_warps {self.num_warps})")
        if self.block_n not in (64, 128):
            reasons.append(f"wgmma: block_n {self.block_n} must be 64 or 128")
        if head_dim % 64:
            reasons.append(f"wgmma: head_dim {head_dim} must be a multiple of 64 (128-byte slabs)")
        return reasons + _pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """fp32 accumulator registers per thread: O (or dQ) plus one S tile."""
        return self.m_tiles * (head_dim + self.block_n) // 2

    def smem_bytes(self, head_dim: int, kind: str = "fwd") -> int:
        """Dynamic shared memory: FwdSmem (Q + stages x (K, V)) or DqSmem (Q, dO + stages x (K, V))."""
        q_rows = self.block_m if kind == "fwd" else 2 * self.block_m
        if self.wgmma:  # Sm90FwdSmem: unpadded rows, plus the slack that aligns it to 1024 bytes
            return (q_rows + 2 * self.stages * self.block_n) * head_dim * ELEMENT_BYTES + WGMMA_ALIGN_SLACK
        return (q_rows + 2 * self.stages * self.block_n) * _row_bytes(head_dim)

    def fits(self, head_dim: int, limits: DeviceLimits, kind: str = "fwd") -> bool:
        if self.wgmma and (kind != "fwd" or limits.compute_capability != (9, 0)):
            return False  # wgmma exists on sm_90 only, and only the forward uses it
        return (
            not self.problems(head_dim)
            and self.smem_bytes(head_dim, kind) <= limits.smem_per_block_optin
            and self.acc_floats(head_dim) <= FWD_MAX_ACC_FLOATS
            and self.num_warps * 32 <= 1024
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DkdvConfig:
    """The dK/dV kernel: block_n keys per block, Q/dO tiles of block_m queries in `stages`
    slots; warps form a (num_warps / warps_d) x warps_d grid over (keys, head_dim).

    wgmma=True selects the Hopper kernel (flash_bwd_dkdv_sm90.cu, sm_90 only, head dims 64, 128
    and 256): two warpgroups of 4 warps own 64 keys each (block_n 128; at head_dim 256 they
    share 64 keys and split the columns), warps_d is 1, tiles are 128-byte swizzled."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int = 2
    warps_d: int = 1
    wgmma: bool = False

    @property
    def m_tiles(self) -> int:
        return self.block_n // (16 * (self.num_warps // self.warps_d))

    def problems(self, head_dim: int) -> list[str]:
        if self.wgmma:
            return self._wgmma_problems(head_dim)
        reasons = []
        warps_n = self.num_warps // self.warps_d if self.num_warps % self.warps_d == 0 else 0
        if not warps_n or self.block_n % (16 * warps_n) or self.block_n // (16 * warps_n) not in (1, 2):
            reasons.append(f"block_n {self.block_n} must be 16 or 32 keys per warp row ({warps_n} warp rows)")
        if self.block_m % (16 * self.warps_d):
            reasons.append(f"block_m {self.block_m} must split into 16-query steps over {self.warps_d} warps")
        if head_dim % (16 * self.warps_d):
            reasons.append(f"head_dim {head_dim} must split into 16-column pairs over {self.warps_d} warps")
        dq_warps_m = min(self.block_m // 16, self.num_warps)
        if dq_warps_m == 0 or self.num_warps % dq_warps_m or (self.block_m // 16) % dq_warps_m:
            reasons.append(f"block_m {self.block_m} rows of dQ must split evenly over {self.num_warps} warps")
        elif head_dim % (16 * (self.num_warps // dq_warps_m)):
            reasons.append(f"head_dim {head_dim} columns of dQ must split evenly over the warps")
        return reasons + _pipeline_and_dim_problems(self.stages, head_dim)

    def _wgmma_problems(self, head_dim: int) -> list[str]:
        reasons = []
        # One warpgroup (4 warps) compiles too, but spills with atomic dQ (ptxas, NVRTC 12.9).
        # Head dim 256 splits its columns over the two warpgroups, which share 64 keys.
        block_n = 64 if head_dim > 128 else 128
        if self.num_warps != 8 or self.block_n != block_n:
            reasons.append(f"wgmma: num_warps must be 8 (two warpgroups) and block_n {block_n} at head_dim "
                           f"{head_dim} (block_n {self.block_n}, num_warps {self.num_warps})")
        if self.block_m not in (64, 128):
            reasons.append(f"wgmma: block_m {self.block_m} must be 64 or 128")
        if self.warps_d != 1:
            reasons.append(f"wgmma: warps_d must be 1 (got {self.warps_d}); the kernel splits head_dim itself")
        if head_dim not in (64, 128, 256):
            reasons.append(f"wgmma: head_dim {head_dim} must be 64, 128 or 256")
        return reasons + _pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """dK + dV accumulators plus the S^T and dP^T tiles, per thread."""
        if self.wgmma:  # 64 keys x (2 head_dim + 2 block_m) over 128 threads; 256 split in two
            return (head_dim if head_dim <= 128 else head_dim // 2) + self.block_m
        return self.m_tiles * (head_dim + self.block_m) // self.warps_d

    def smem_bytes(self, head_dim: int) -> int:
        """DkdvSmem: K, V + stages x (Q, dO, lse, delta) + P^T and dS^T; Sm90DkdvSmem: the same
        unpadded without P^T, plus each warpgroup's dQ staging buffer and the slack that aligns
        it to 1024 bytes."""
        stats = 2 * self.stages * self.block_m * 4
        if self.wgmma:  # head_dim 256 adds P^T on the next 1024-byte boundary (Sm90DkdvSplitSmem)
            tiles = (2 * self.block_n + 2 * self.stages * self.block_m) * head_dim * ELEMENT_BYTES
            dq_stage = 2 * 64 * sm90_dq_stage_cols(head_dim) * 4
            size = tiles + self.block_n * self.block_m * ELEMENT_BYTES + stats + dq_stage
            if head_dim > 128:
                size = -(-size // 1024) * 1024 + self.block_n * self.block_m * ELEMENT_BYTES
            return size + WGMMA_ALIGN_SLACK
        kv = 2 * self.block_n * _row_bytes(head_dim)
        q_do = 2 * self.stages * self.block_m * _row_bytes(head_dim)
        p_ds = 2 * self.block_n * (self.block_m + SMEM_PAD) * ELEMENT_BYTES
        return kv + q_do + stats + p_ds

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        if self.wgmma and limits.compute_capability != (9, 0):
            return False  # wgmma exists on sm_90 only
        return (
            not self.problems(head_dim)
            and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
            and self.acc_floats(head_dim) <= BWD_MAX_ACC_FLOATS
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BwdConfig:
    """The backward pass: the dK/dV kernel, and how dQ is made. With dq_atomic, the dK/dV
    kernel adds dQ into a float32 buffer with atomics (fast, not bitwise repeatable); without,
    the dQ kernel (`dq` tiles) makes it in its own pass. deterministic=True forces the latter."""

    dkdv: DkdvConfig
    dq: TileConfig
    dq_atomic: bool = True

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return self.dkdv.fits(head_dim, limits) and self.dq.fits(head_dim, limits, kind="dq")

    def to_dict(self) -> dict[str, Any]:
        return {"dkdv": self.dkdv.to_dict(), "dq": self.dq.to_dict(), "dq_atomic": self.dq_atomic}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BwdConfig:
        return cls(DkdvConfig(**data["dkdv"]), TileConfig(**data["dq"]), bool(data["dq_atomic"]))


def fwd_candidates(head_dim: int, limits: DeviceLimits) -> list[TileConfig]:
    """Every forward config worth timing for head_dim on this device (wgmma ones on sm_90)."""
    space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    configs = [TileConfig(m, n, w, s) for m, n, w, s in space]
    wgmma_space = itertools.product((64, 128), (4, 8, 12), (2, 3))
    configs += [TileConfig(16 * w, n, w, s, wgmma=True) for n, w, s in wgmma_space]
    return [c for c in configs if c.fits(head_dim, limits)]


def dkdv_candidates(head_dim: int, limits: DeviceLimits) -> list[DkdvConfig]:
    space = itertools.product((32, 64, 128), (64, 128), (4, 8), (2,), (1, 2))
    configs = [DkdvConfig(m, n, w, s, wd) for m, n, w, s, wd in space]
    # wgmma: Q tiles of 128 with three stages spill with atomic dQ at head_dim 64 (ptxas, 255 regs).
    configs += [DkdvConfig(m, 128, 8, s, 1, wgmma=True) for m, s in ((64, 2), (64, 3), (128, 2))]
    configs += [DkdvConfig(64, 64, 8, 2, 1, wgmma=True)]  # head_dim 256 (columns split)
    configs += [DkdvConfig(32, 16, 2, 2, 2)]  # head_dim 256 on 99 KB GPUs (heuristics.DKDV_TABLE)
    return [c for c in configs if c.fits(head_dim, limits)]


def dq_candidates(head_dim: int, limits: DeviceLimits) -> list[TileConfig]:
    space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2,))
    configs = [TileConfig(m, n, w, s) for m, n, w, s in space]
    configs += [TileConfig(64, 16, 4, 2)]  # head_dim 192 and 256 on 99 KB GPUs (heuristics.DQ_TABLE)
    return [c for c in configs if c.fits(head_dim, limits, kind="dq")]
