"""The mma.sync dK/dV kernel (kernels_cu/flash_bwd_dkdv.cu): sm_80 and up; on sm_90 it runs head
dims up to 32 by default (flash_bwd_dkdv_sm90.DEFAULT_HEAD_DIMS).

A block owns block_n keys of one kv head and walks the Q / dO tiles (block_m queries, `stages`
slots) of every q head of its group. Warps form a (num_warps / warps_d) x warps_d grid over
(keys, head_dim). With atomic dQ it also adds dQ / softmax_scale into a float32 buffer shaped
like q; flash_bwd_prep.py's flash_bwd_convert_dq turns that into dq.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Any

from .. import build
from ..device import DeviceLimits
from ..problem import Problem
from .common import (ELEMENT_BYTES, SMEM_PAD, defines, first_fitting, padded_row_bytes, pipeline_and_dim_problems,
                     Variant)

SOURCE, ENTRY = "flash_bwd_dkdv.cu", "flash_bwd_dkdv"
CONVERT_ENTRY = "flash_bwd_convert_dq"  # reads this kernel's dQ accumulator (flash_bwd_prep.py)
# dK + dV + S^T + dP^T floats per thread above which ptxas spills (about 200).
MAX_ACC_FLOATS = 200
# dQ by float32 atomics from this kernel, or in its own pass (flash_bwd_dq.py). H100, fp16:
# atomics win at head_dim 64; at 128 the separate pass won 3 of 4 buckets (s2048 full and
# causal, s8192 causal); at 256 the atomic variant spills. So above 64, dQ gets its own pass.
MAX_ATOMIC_DQ_HEAD_DIM = 64


@dataclass(frozen=True)
class DkdvConfig:
    block_m: int
    block_n: int
    num_warps: int
    stages: int = 2
    warps_d: int = 1

    kernel = ENTRY

    @property
    def m_tiles(self) -> int:
        return self.block_n // (16 * (self.num_warps // self.warps_d))

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def problems(self, head_dim: int) -> list[str]:
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
        return reasons + pipeline_and_dim_problems(self.stages, head_dim)

    def acc_floats(self, head_dim: int) -> int:
        """dK + dV accumulators plus the S^T and dP^T tiles, per thread."""
        return self.m_tiles * (head_dim + self.block_m) // self.warps_d

    def smem_bytes(self, head_dim: int) -> int:
        """DkdvSmem: K, V + stages x (Q, dO, lse_log2, delta) + P^T and dS^T, padded rows."""
        kv = 2 * self.block_n * padded_row_bytes(head_dim)
        q_do = 2 * self.stages * self.block_m * padded_row_bytes(head_dim)
        stats = 2 * self.stages * self.block_m * 4
        p_ds = 2 * self.block_n * (self.block_m + SMEM_PAD) * ELEMENT_BYTES
        return kv + q_do + stats + p_ds

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return (not self.problems(head_dim) and self.smem_bytes(head_dim) <= limits.smem_per_block_optin
                and self.acc_floats(head_dim) <= MAX_ACC_FLOATS)

    def atomic_dq_by_default(self, head_dim: int) -> bool:
        return head_dim <= MAX_ATOMIC_DQ_HEAD_DIM

    def dq_accum_shape(self, p: Problem) -> tuple[int, ...]:
        """The float32 dQ accumulator: like q (batch, seqlen_q, heads_q, stored head dim), or
        (1, total_q, heads_q, stored head dim) for a packed batch (the kernels' view of q then)."""
        if p.varlen:
            return (1, p.total_q, p.heads_q, p.stored_head_dim)
        return (p.batch, p.seqlen_q, p.heads_q, p.stored_head_dim)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}


CONFIG = DkdvConfig  # the config class of this family (plan.config_from_dict)


@functools.lru_cache(maxsize=None)
def spec(dtype: str, head_dim: int, cfg: DkdvConfig, accum_dq: bool, *,
         variant: Variant) -> build.KernelSpec:
    return build.KernelSpec(SOURCE, ENTRY, defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, warps_d=cfg.warps_d, accum_dq=accum_dq, smem_bytes=cfg.smem_bytes(head_dim),
        **variant.mask_defines()))


def grid(p: Problem, cfg: DkdvConfig) -> tuple[int, int, int]:
    """One block per block_n keys of each (kv head, batch)."""
    return (-(-p.seqlen_k // cfg.block_n), p.heads_kv, p.batch)


def candidates(head_dim: int, limits: DeviceLimits) -> list[DkdvConfig]:
    space = itertools.product((32, 64, 128), (64, 128), (4, 8), (2,), (1, 2))
    configs = [DkdvConfig(*values) for values in space]
    configs.append(DkdvConfig(32, 16, 2, 2, 2))  # head_dim 256 on 99 KB GPUs (TABLE)
    return [c for c in configs if c.fits(head_dim, limits)]


# (largest head dim, config, why it wins): the first row that fits the device is the default.
# H100, fp16, paper grid, S = 1024..8192 (benchmarks/results/h100-2026-11-23-wgmma-bwd/bwd-sweep-fp16.json).
TABLE: tuple[tuple[int, DkdvConfig, str], ...] = (
    (64, DkdvConfig(32, 128, 4, 2, 1), "H100: 185-219 TFLOP/s against 150-182 for 64x128 on 8 warps; 75 KB"),
    (128, DkdvConfig(64, 128, 8, 2, 2), "H100: 178-216 TFLOP/s against 152-188 for 32x128 unsplit; 173 KB"),
    (128, DkdvConfig(64, 64, 4, 2, 1), "A100 (163 KB per block): 121 KB at d128"),
    (128, DkdvConfig(32, 64, 4, 2, 1), "sm_86/89 (99 KB per block): 79 KB at d128"),
    (256, DkdvConfig(64, 64, 8, 2, 2), "warps split head_dim in two so dK, dV fit in registers; 217 KB at d256"),
    (256, DkdvConfig(32, 64, 8, 2, 2), "A100: 143 KB at d256"),
    (192, DkdvConfig(32, 32, 4, 2, 2), "sm_86/89: 81 KB at d192"),
    (256, DkdvConfig(32, 16, 2, 2, 2), "sm_86/89: 86 KB at d256, 16 keys, two warps splitting head_dim; 255 "
                                       "regs, no spills (ptxas, NVRTC 12.9, sm_89); slow, but the only d256 "
                                       "tile of this kernel that fits 99 KB"),
)


def default(head_dim: int, limits: DeviceLimits) -> DkdvConfig | None:
    return first_fitting(TABLE, head_dim, lambda c: c.fits(head_dim, limits))
