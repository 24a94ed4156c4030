"""One timing function for everything that measures: the benchmark, the autotuner, scripts.

Warm-up runs first (module load and compilation stay out of the numbers), then each timed run
is bracketed by CUDA events on the current stream, with the L2 cache flushed before it so
repeated runs over one buffer do not measure the cache; the median is reported.

Between the flush and the start event the GPU is kept busy for HOST_SLACK_US (busy_wait.cu), so
the host has queued the call's kernels before its interval starts: the time is the GPU's work
alone, for every implementation alike. Without it a call's host-side work (Python, launches)
fell inside the interval whenever it outlasted the flush, and calls with more host work or more
launches (a packed varlen backward: 4 kernels) lost up to 7% at 0.3 ms (2026-12-04, H200).
Host time is measured on its own (scripts/host_overhead.py).

do_bench_interleaved times several calls whose ratio matters (the varlen call against the dense
call on the same tokens) in alternation, so that the GPU's clock and temperature, which drift
over seconds, fall on each of them alike instead of on whichever ran later.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .device import require_cupy

L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times any current L2 (H100: 50 MB)
HOST_SLACK_US = 500  # longer than any call's host work (a cold-path call of cupyflash: ~100 us)


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


_busy_wait_kernels: dict[int, Any] = {}


def _busy_wait(cupy: Any, stream: Any, microseconds: int) -> None:
    """Queue busy_wait.cu on stream (one warp, `microseconds` long)."""
    device = cupy.cuda.runtime.getDevice()
    kernel = _busy_wait_kernels.get(device)
    if kernel is None:
        from .build import kernel_dir

        source = (kernel_dir() / "busy_wait.cu").read_text()
        kernel = _busy_wait_kernels[device] = cupy.RawModule(code=source).get_function("busy_wait")
    kernel((1,), (32,), (cupy.uint64(microseconds * 1000),), stream=stream)


def do_bench(fn: Callable[[], Any], *, warmup: int = 3, runs: int = 20, flush_l2: bool = True,
             hide_host: bool = True) -> Timing:
    """Median time of fn() in milliseconds, measured with CUDA events on the current stream."""
    return do_bench_interleaved([fn], warmup=warmup, runs=runs, flush_l2=flush_l2, hide_host=hide_host)[0]


def do_bench_interleaved(fns: Sequence[Callable[[], Any]], *, warmup: int = 3, runs: int = 20,
                         flush_l2: bool = True, hide_host: bool = True) -> list[Timing]:
    """One Timing per fn, in order. Round r runs every fn once, starting with fn r % len(fns),
    each timed on its own (L2 flushed before it; with hide_host, the GPU kept busy while the host
    queues it: the module docstring): no fn always follows the same one."""
    cupy = require_cupy()
    stream = cupy.cuda.get_current_stream()
    for _ in range(warmup):
        for fn in fns:
            fn()
    stream.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(runs):
        for j in range(len(fns)):
            i = (r + j) % len(fns)
            if flush_l2:
                _flush_l2(cupy)
            if hide_host:
                _busy_wait(cupy, stream, HOST_SLACK_US)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fns[i]()
            end.record(stream)
            end.synchronize()
            times[i].append(cupy.cuda.get_elapsed_time(start, end))
    return [Timing(statistics.median(t), min(t), max(t), runs) for t in times]
