"""Which config runs a problem: a tuned one from `cupyflash autotune` when the tuning cache has
the problem's bucket, else the heuristic table. Nothing is timed during a normal call.

`forced(...)` pins configs for the calls made inside it (this thread only): the autotuner
times candidates through the real API path with it, and tests inject broken configs with it.
Calls inside it neither use nor make cached launch plans (plan.py), which hold a config.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from . import heuristics, tuning
from .config import BwdConfig, TileConfig
from .device import DeviceLimits
from .problem import Problem

_override = threading.local()
_NOTHING_FORCED = (None, None)


@contextmanager
def forced(fwd: TileConfig | None = None, bwd: BwdConfig | None = None) -> Iterator[None]:
    previous = getattr(_override, "configs", _NOTHING_FORCED)
    _override.configs = (fwd, bwd)
    try:
        yield
    finally:
        _override.configs = previous


def is_forced() -> bool:
    """Whether a forced(...) block pins a config in this thread."""
    return getattr(_override, "configs", _NOTHING_FORCED) != _NOTHING_FORCED


def _config(kind: str, problem: Problem, kernel_dim: int, limits: DeviceLimits) -> TileConfig | BwdConfig:
    pinned = getattr(_override, "configs", _NOTHING_FORCED)[0 if kind == "fwd" else 1]
    if pinned is not None:
        return pinned
    tuned = tuning.lookup(kind, problem, kernel_dim, limits)
    if tuned is not None:
        return tuned
    default = heuristics.default_fwd_config if kind == "fwd" else heuristics.default_bwd_config
    return default(kernel_dim, limits)


def fwd_config(problem: Problem, kernel_dim: int, limits: DeviceLimits) -> TileConfig:
    return _config("fwd", problem, kernel_dim, limits)


def bwd_config(problem: Problem, kernel_dim: int, limits: DeviceLimits) -> BwdConfig:
    return _config("bwd", problem, kernel_dim, limits)
