"""Every environment variable cupyflash reads, in one place.

CUPYFLASH_CACHE_DIR
    Root of the on-disk caches. Compiled kernels (cubins) go to ``<root>/kernels`` and tuned
    configurations to ``<root>/tuning``. Default: ``$XDG_CACHE_HOME/cupyflash``, or
    ``~/.cache/cupyflash`` when XDG_CACHE_HOME is unset. A cached cubin is used only when its
    length, sha256 and ELF header match the metadata stored beside it; a bad entry is warned
    about (``build.CacheWarning``), recompiled and replaced. When ``<root>/kernels`` cannot be
    created or written, cupyflash warns once per process and compiles kernels in memory
    (``cupyflash info`` reports it, from ``build.disk_cache_problem()``).
CUPYFLASH_TUNING_DIR
    Where ``cupyflash autotune`` stores and ``attention()`` looks up tuned configurations,
    overriding ``<root>/tuning``.
CUPYFLASH_NO_DISK_CACHE
    Set to 1 to compile every kernel in memory and never read or write cubins on disk.
CUPYFLASH_DECODE_BULK_COPIES
    Set to 1 for decoding (``attention_with_kvcache``) to read its key and value tiles by bulk
    tensor copies on sm_90 where they can (``flash_decode.bulk_copies_enabled``'s starting value).
    Experimental: written without a GPU to run it on, off until measured. Read at import.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ
    return _cache_root(env.get("CUPYFLASH_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


# Path arithmetic with expanduser costs ~10 us, and attention() asks for the tuning dir on every
# call: the answer is memoized per value of the variables it depends on.
@functools.lru_cache(maxsize=32)
def _cache_root(explicit: str | None, xdg: str | None, home: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cupyflash"


def kernel_cache_dir() -> Path:
    return cache_root() / "kernels"


def tuning_dir() -> Path:
    env = os.environ
    return _tuning_dir(env.get("CUPYFLASH_TUNING_DIR"), env.get("CUPYFLASH_CACHE_DIR"), env.get("XDG_CACHE_HOME"),
                       env.get("HOME"))


@functools.lru_cache(maxsize=32)
def _tuning_dir(explicit: str | None, cache: str | None, xdg: str | None, home: str | None) -> Path:
    return Path(explicit).expanduser() if explicit else _cache_root(cache, xdg, home) / "tuning"


def disk_cache_enabled() -> bool:
    return os.environ.get("CUPYFLASH_NO_DISK_CACHE", "0") not in ("1", "true", "yes")


def decode_bulk_copies() -> bool:
    return os.environ.get("CUPYFLASH_DECODE_BULK_COPIES", "0") in ("1", "true", "yes")
