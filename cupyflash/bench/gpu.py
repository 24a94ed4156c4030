"""What one call costs besides its time, and the housekeeping between calls: the peak device
memory a call allocates, the wall time of a first call and the cubins it compiled, freeing
cached memory, and exception texts short enough for a report row.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any, Callable

from .. import settings
from ..device import cupy_module, require_cupy

MIB = 2**20
MAX_MESSAGE = 600  # characters kept of an exception or warning text


def short(exc: BaseException) -> str:
    """"Type: message" on one line, cut to MAX_MESSAGE characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def free_memory() -> None:
    """Give cached device memory back (CuPy's pool, and PyTorch's cache when it is loaded)."""
    gc.collect()
    cupy = cupy_module()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def free_device_bytes() -> int:
    """Bytes of device memory free for new arrays: the driver's free memory and CuPy's pool's."""
    cupy = require_cupy()
    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def nbytes(result: Any) -> int:
    """Bytes of an array or of a tuple of arrays."""
    arrays = result if isinstance(result, tuple) else (result,)
    return sum(int(a.size) * a.dtype.itemsize for a in arrays)


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s result and the peak of CuPy pool bytes in use during it, above the level before.

    Every allocation goes through a wrapper around the current allocator that samples the
    default pool's used_bytes() right after each malloc (the peak is always reached just after
    one); frees need no tracking. Counts every byte CuPy allocates during the call, the outputs
    included, rounded to the pool's 512-byte blocks.
    """
    cupy = require_cupy()
    pool = cupy.get_default_memory_pool()
    cupy.cuda.get_current_stream().synchronize()
    before = pool.used_bytes()
    peak = [before]
    previous = cupy.cuda.get_allocator()

    def counting_malloc(size: int) -> Any:
        memory = previous(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory

    cupy.cuda.set_allocator(counting_malloc)
    try:
        result = fn()
        cupy.cuda.get_current_stream().synchronize()
    finally:
        cupy.cuda.set_allocator(previous)
    return result, peak[0] - before


def _cubin_count() -> int | None:
    """Cubins in the disk cache (None when it is disabled)."""
    if not settings.disk_cache_enabled():
        return None
    directory = settings.kernel_cache_dir()
    return sum(1 for _ in directory.glob("*.cubin")) if directory.is_dir() else 0


def first_call(fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
    """fn()'s result, its wall time in ms (compile and module load included: what a user
    waits for on a first call), and how many cubins it added to the disk cache (NVRTC runs)."""
    before = _cubin_count()
    start = time.perf_counter()
    result = fn()
    require_cupy().cuda.get_current_stream().synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    after = _cubin_count()
    return result, wall_ms, (None if before is None or after is None else after - before)
