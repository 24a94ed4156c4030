"""What every kernel family shares: the compiled head dims, the element types, the pipeline
rule, the -D macros of a variant and the first-fitting walk over a heuristic table."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, TypeVar

from ..device import DeviceLimits

# Head dims with a compiled kernel; any other multiple of 8 runs on the next one up, with the
# extra columns zero-filled on load and skipped on store.
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
MAX_HEAD_DIM = KERNEL_HEAD_DIMS[-1]
ELEMENT = {"float16": "cf::Half", "bfloat16": "cf::BFloat16"}  # the C++ type of each dtype (traits.cuh)
ELEMENT_BYTES = 2
SMEM_PAD = 8  # elements of padding per shared row of the mma.sync kernels (kSmemPad, traits.cuh)
HOPPER = (9, 0)  # wgmma exists on sm_90 only

Config = TypeVar("Config")


def kernel_head_dim(head_dim: int) -> int:
    """The compiled head dim that runs a problem of this head dim (head_dim <= 256)."""
    return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def round_up(n: int, unit: int) -> int:
    """n rounded up to a multiple of unit (a shared struct's 1024-byte boundaries, say)."""
    return -(-n // unit) * unit


def whole_slabs(head_dim: int) -> int:
    """head_dim rounded up to whole 64-column slabs: one 128-byte swizzle span of 16-bit elements,
    the width of the Hopper kernels' shared tiles (and of flash_fwd_tma's boxes)."""
    return round_up(head_dim, 64)


def padded_row_bytes(head_dim: int) -> int:
    """One shared-memory row of an mma.sync tile: head_dim elements and the bank-conflict pad."""
    return (head_dim + SMEM_PAD) * ELEMENT_BYTES


def pipeline_and_dim_problems(stages: int, head_dim: int) -> list[str]:
    """The rules every kernel shares: double-buffered (or deeper) tiles, a compiled head dim."""
    reasons = [] if stages >= 2 else ["stages must be at least 2"]
    if head_dim not in KERNEL_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} has no kernel; compiled head dims are {KERNEL_HEAD_DIMS}")
    return reasons


def defines(dtype: str, **values: int) -> tuple[tuple[str, str], ...]:
    """The -D macros of one variant: CF_ELEMENT, then CF_<NAME> for each value, in order."""
    return (("CF_ELEMENT", ELEMENT[dtype]),) + tuple((f"CF_{k.upper()}", str(int(v))) for k, v in values.items())


class Variant(NamedTuple):
    """What a call fixes at compile time besides dtype, head dim and tile config (Problem.variant):
    which sides of its window bound the keys (CF_WINDOW_LEFT / CF_WINDOW_RIGHT, mask.cuh) and
    whether its batch is packed with variable lengths (CF_VARLEN, sequence.cuh). A kernel compiled
    without a window side ignores that side of the parameter block, so both must come from the
    same Problem (plan.py builds both)."""

    window_left: bool
    window_right: bool
    varlen: bool

    def mask_defines(self) -> dict[str, bool]:
        """The macros of a kernel that masks scores (all but the small backward ones)."""
        return {"window_left": self.window_left, "window_right": self.window_right, "varlen": self.varlen}

    def sequence_defines(self) -> dict[str, bool]:
        """The macros of a kernel that only needs to know where its sequence is."""
        return {"varlen": self.varlen}


def first_fitting(table: Sequence[tuple[int, Config, str]], head_dim: int,
                  fits: Callable[[Config], bool]) -> Config | None:
    """The first row whose head-dim bound covers head_dim and whose config fits, or None."""
    for max_dim, config, _why in table:
        if head_dim <= max_dim and fits(config):
            return config
    return None


def no_config_error(what: str, head_dim: int, limits: DeviceLimits) -> RuntimeError:
    return RuntimeError(f"no built-in {what} config for head_dim {head_dim} fits {limits.name} "
                        f"({limits.smem_per_block_optin} bytes of shared memory per block)")
