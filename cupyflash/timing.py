"""One timing function for everything that measures: the benchmark, the autotuner, scripts.

Warm-up runs first (module load and compilation stay out of the numbers), then each timed run
is bracketed by CUDA events on the current stream, with the L2 cache flushed before it so
repeated runs over one buffer do not measure the cache; the median is reported.

The warm-up is a number of calls and also a minimum time. Three calls of a 0.2 ms kernel were
not enough: on an H100, the first of three medians of one shape sometimes came out 20% low
(benchmarks/results/h100-2026-11-23-wgmma/short-seq-diagnostics.log), as Triton's do_bench
also guards against with its 25 ms warm-up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from .device import require_cupy

L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times any current L2 (H100: 50 MB)
MAX_WARMUP_CALLS = 1000  # bound on the time-based warm-up for very short calls


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


_flush_buffers: dict[int, Any] = {}


def _flush_l2(cupy: Any) -> None:
    device = cupy.cuda.runtime.getDevice()
    buffer = _flush_buffers.get(device)
    if buffer is None:
        buffer = _flush_buffers[device] = cupy.empty(L2_FLUSH_BYTES // 4, dtype=cupy.int32)
    buffer.fill(0)


def do_bench(fn: Callable[[], Any], *, warmup: int = 3, runs: int = 20, flush_l2: bool = True,
             warmup_ms: float = 25.0) -> Timing:
    """Median time of fn() in milliseconds, measured with CUDA events on the current stream,
    after at least `warmup` calls and at least `warmup_ms` of warm-up (device work included)."""
    cupy = require_cupy()
    stream = cupy.cuda.get_current_stream()
    start, calls = time.perf_counter(), 0
    while calls < warmup or (calls < MAX_WARMUP_CALLS and (time.perf_counter() - start) * 1e3 < warmup_ms):
        fn()
        calls += 1
        if calls >= warmup:
            stream.synchronize()  # the clock must include the device's work
    stream.synchronize()
    times = []
    for _ in range(runs):
        if flush_l2:
            _flush_l2(cupy)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return Timing(statistics.median(times), min(times), max(times), runs)
