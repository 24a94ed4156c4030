"""How long NVRTC takes to compile each kernel a default-config call runs, measured straight
through build.compile_kernel (no disk cache), with the registers and spills ptxas reports.

Which kernels a call runs is asked of the library in one place, _default_specs().
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from .. import build
from ..device import current_device_id, device_limits
from .gpu import short
from .grid import DTYPES


def _default_specs(dtype: str, head_dim: int, limits: Any) -> list[tuple[str, build.KernelSpec]]:
    """(pass, spec) of every kernel a default-config call of head_dim runs on a GPU of `limits`:
    fwd; bwd; bwd-det (the deterministic backward), as plan.py lists them. A kernel the
    deterministic backward shares with the other is listed once, under bwd."""
    from .. import plan
    from ..problem import Problem

    problem = Problem(1, 128, 128, 1, 1, head_dim, dtype, False, head_dim ** -0.5, (-1, -1))
    kernel_dim = problem.kernel_head_dim
    specs = [("fwd", call.spec) for call in plan.forward_kernels(problem, plan.default_fwd_config(kernel_dim, limits))]
    bwd = plan.default_bwd_config(kernel_dim, limits)
    atomic = [call.spec for call in plan.backward_kernels(problem, bwd, deterministic=False)]
    specs += [("bwd", spec) for spec in atomic]
    specs += [("bwd-det", call.spec) for call in plan.backward_kernels(problem, bwd, deterministic=True)
              if call.spec not in atomic]
    return specs


def measure_compile_times(dtypes: Sequence[str] = DTYPES, head_dims: Sequence[int] = (64, 128, 256), *,
                          limits: Any = None) -> list[dict[str, Any]]:
    """Seconds NVRTC takes to compile each kernel of the default (heuristic) configs, straight
    through build.compile_kernel (no disk cache), for `limits` (a device.DeviceLimits; default
    the current GPU's; a made-up one works without a GPU). Kernels shared between head dims
    (the δ and dQ-convert kernels) are compiled once. One dict per kernel: dtype, head_dim,
    pass, entry, arch, seconds, registers, spill_bytes, memoized (True when build.py already
    held the program, so seconds is not a compile: call this before anything else compiles;
    the δ and dQ-convert entry points share one program), and failure (the error text) when
    the compile failed. NVRTC 12.9+ also keeps a cache of its own: on the H100 machine (NVRTC
    13.0) a program compiled before, in this process or an earlier one, came back in about
    40 ms with an empty log, so honest numbers need a machine that has not compiled these
    kernels yet."""
    limits = limits if limits is not None else device_limits(current_device_id())
    rows, seen = [], set()
    for dtype, head_dim in itertools.product(dtypes, head_dims):
        for pass_, spec in _default_specs(dtype, head_dim, limits):
            if spec in seen:
                continue
            seen.add(spec)
            rows.append({"dtype": dtype, "head_dim": head_dim, "pass": pass_, "entry": spec.entry,
                         "arch": spec.target(limits.arch), **_time_compile(spec, limits.arch)})
    return rows


def _memoized(spec: build.KernelSpec, arch: str) -> bool:
    """Whether build.py already holds spec's program (compiled earlier in this process, or by
    another entry point of the same file): compiling it again costs nothing."""
    key_of, programs = getattr(build, "_program_key", None), getattr(build, "_programs", None)
    return bool(key_of is not None and programs is not None and key_of(spec, arch) in programs)


def _time_compile(spec: build.KernelSpec, arch: str) -> dict[str, Any]:
    """seconds, registers, spill_bytes, memoized of one compile; a failure is recorded, not raised."""
    memoized = _memoized(spec, arch)
    start = time.perf_counter()
    try:
        kernel = build.compile_kernel(spec, arch)
    except Exception as exc:
        return {"seconds": time.perf_counter() - start, "registers": None, "spill_bytes": None,
                "memoized": memoized, "failure": short(exc)}
    return {"seconds": time.perf_counter() - start, "registers": kernel.registers, "spill_bytes": kernel.spill_bytes,
            "memoized": memoized}
