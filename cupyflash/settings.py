"""Every environment variable cupyflash reads, in one place.

CUPYFLASH_CACHE_DIR
    Root of the on-disk caches. Compiled kernels (cubins) go to ``<root>/kernels`` and tuned
    configurations to ``<root>/tuning``. Default: ``$XDG_CACHE_HOME/cupyflash``, or
    ``~/.cache/cupyflash`` when XDG_CACHE_HOME is unset.
CUPYFLASH_TUNING_DIR
    Where ``cupyflash autotune`` stores and ``attention()`` looks up tuned configurations,
    overriding ``<root>/tuning``.
CUPYFLASH_NO_DISK_CACHE
    Set to 1 to compile every kernel in memory and never read or write cubins on disk.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("CUPYFLASH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cupyflash"


def kernel_cache_dir() -> Path:
    return cache_root() / "kernels"


def tuning_dir() -> Path:
    explicit = os.environ.get("CUPYFLASH_TUNING_DIR")
    return Path(explicit).expanduser() if explicit else cache_root() / "tuning"


def disk_cache_enabled() -> bool:
    return os.environ.get("CUPYFLASH_NO_DISK_CACHE", "0") not in ("1", "true", "yes")
