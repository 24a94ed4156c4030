"""Which config runs a problem: a tuned one from `cupyflash autotune` when the tuning cache has
the problem's bucket, else the heuristic table. Nothing is timed during a normal call."""

from __future__ import annotations

from . import heuristics, tuning
from .config import BwdConfig, TileConfig
from .device import DeviceLimits
from .problem import Problem


def fwd_config(problem: Problem, kernel_dim: int, limits: DeviceLimits) -> TileConfig:
    tuned = tuning.lookup("fwd", problem, kernel_dim, limits)
    return tuned if tuned is not None else heuristics.default_fwd_config(kernel_dim, limits)


def bwd_config(problem: Problem, kernel_dim: int, limits: DeviceLimits) -> BwdConfig:
    tuned = tuning.lookup("bwd", problem, kernel_dim, limits)
    return tuned if tuned is not None else heuristics.default_bwd_config(kernel_dim, limits)
