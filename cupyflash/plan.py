"""Launch plans: what a repeat call with the same array layouts and options reuses.

A training or inference loop calls attention() with the same shapes again and again. The first
call of a kind checks everything (problem.py), picks a config (selection.py), loads the kernels
and packs their arguments (launch.py); its Plan keeps the outcome: the outputs and temporaries
to allocate, and one Launch per kernel. A later call whose arrays have the same type, shape,
strides and dtype, with the same options, on the same device, finds that plan (find) and only
allocates, writes the array pointers into the packed arguments and launches (Plan.run). That
is where the host time of a short-sequence call went: scripts/host_overhead.py times both.

The first call runs its plan the same way (Plan.launch), so there is one launch path. A plan
is cached (keep) only when it can serve a repeat call unchanged; find only serves calls that
its key and a few per-call checks prove to be such repeats. Everything else takes the full
path, which reports bad inputs with the same errors as ever.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import launch, selection, tuning
from .config import kernel_head_dim
from .device import DeviceLimits, current_device_id, device_limits, require_cupy
from .problem import Problem, array_signature

FORWARD_RESULTS = ("out", "lse")
BACKWARD_RESULTS = ("dq", "dk", "dv")
MAX_PLANS = 256  # per thread; the cache is cleared when full, like the other memo caches
POINTER_ALIGN = 16  # cp.async moves 16 bytes: the kernels need 16-byte aligned rows


class Buffer(NamedTuple):
    """An output or temporary the plan allocates on every call (C-contiguous, current device)."""

    name: str
    allocate: Callable[..., Any]  # cupy.empty, or cupy.zeros where the kernels accumulate into it
    shape: tuple[int, ...]
    dtype: Any


class Plan:
    """The buffers and kernel launches of one call, built once per signature."""

    __slots__ = ("buffers", "launches", "results", "limits", "generation", "recheck_at", "_current_stream")

    def __init__(self, buffers: Sequence[Buffer], launches: Sequence[launch.Launch], results: tuple[str, ...],
                 limits: DeviceLimits, generation: int) -> None:
        self.buffers = tuple(buffers)
        # A grid with a zero dimension is a launch error; such a kernel has nothing to compute.
        self.launches = tuple(x for x in launches if 0 not in x.grid)
        self.results = results
        self.limits, self.generation = limits, generation  # the tuning entries the config came from
        self.recheck_at = time.monotonic() + tuning.RECHECK_SECONDS
        self._current_stream = require_cupy().cuda.get_current_stream

    def run(self, t: dict[str, Any]) -> tuple[Any, ...]:
        """A repeat call: t holds the inputs by name; the outputs are allocated and computed."""
        _allocate(self.buffers, t)
        return self.launch(t)

    def launch(self, t: dict[str, Any]) -> tuple[Any, ...]:
        """Queue every kernel on the current stream; the results by name, from t."""
        stream_ptr = self._current_stream().ptr
        for kernel in self.launches:
            kernel.run(t, stream_ptr)
        return tuple(t[name] for name in self.results)

    def is_current(self) -> bool:
        """False once the tuned configs may differ from those the plan was built with. store() and
        clear() in this process count at once; a file written by another process is looked for
        once per tuning.RECHECK_SECONDS (load_entries may answer from a read up to that old, so
        it is noticed within twice that)."""
        now = time.monotonic()
        if now >= self.recheck_at:
            tuning.load_entries(self.limits)  # changes tuning.generation() if the file changed
            self.recheck_at = now + tuning.RECHECK_SECONDS
        return self.generation == tuning.generation()


def _allocate(buffers: Sequence[Buffer], t: dict[str, Any]) -> None:
    for name, allocate, shape, dtype in buffers:
        t[name] = allocate(shape, dtype)


def build_forward(problem: Problem, t: dict[str, Any], device_id: int) -> Plan:
    """The plan of a forward call on the kernel-ready q, k, v in t. Allocates out and lse into t
    on the way: the launches read their strides."""
    cupy, q = require_cupy(), t["q"]
    limits = device_limits(device_id)
    generation = tuning.generation()  # read before the lookup: a change during it makes the plan stale
    buffers = (Buffer("out", cupy.empty, q.shape, q.dtype),
               Buffer("lse", cupy.empty, (problem.batch, problem.heads_q, problem.seqlen_q), np.float32))
    _allocate(buffers, t)
    launches = []
    if not problem.is_empty:
        kernel_dim = kernel_head_dim(q.shape[3])
        config = selection.fwd_config(problem, kernel_dim, limits)
        launches.append(launch.forward(problem, kernel_dim, config, t, limits, device_id))
    return Plan(buffers, launches, FORWARD_RESULTS, limits, generation)


def build_backward(problem: Problem, t: dict[str, Any], deterministic: bool, device_id: int) -> Plan:
    """The plan of a backward call on the kernel-ready dout, q, k, v, out, lse in t: delta, then
    dK/dV with dQ by atomics and a conversion, or dK/dV and a separate dQ pass. Allocates the
    gradients and temporaries into t on the way."""
    cupy, q, k = require_cupy(), t["q"], t["k"]
    limits = device_limits(device_id)
    generation = tuning.generation()
    if problem.batch == 0 or problem.heads_q == 0 or problem.seqlen_k == 0:
        # Nothing to attend to: every gradient is 0.
        buffers = [Buffer(name, cupy.zeros, like.shape, like.dtype) for name, like in (("dq", q), ("dk", k), ("dv", k))]
        _allocate(buffers, t)
        return Plan(buffers, (), BACKWARD_RESULTS, limits, generation)
    kernel_dim = kernel_head_dim(q.shape[3])
    config = selection.bwd_config(problem, kernel_dim, limits)
    accum_dq = config.dq_atomic and not deterministic
    buffers = [Buffer("dq", cupy.empty, q.shape, q.dtype), Buffer("dk", cupy.empty, k.shape, k.dtype),
               Buffer("dv", cupy.empty, k.shape, k.dtype),
               Buffer("delta", cupy.empty, (problem.batch, problem.heads_q, problem.seqlen_q), np.float32)]
    if accum_dq:  # zeroed: the kernel adds into it
        shape = launch.dq_accum_shape(problem, kernel_dim, config.dkdv, q.shape)
        buffers.append(Buffer("dq_accum", cupy.zeros, shape, np.float32))
    _allocate(buffers, t)
    launches = [launch.backward_delta(problem, t, limits, device_id),
                launch.backward_dkdv(problem, kernel_dim, config, accum_dq, t, limits, device_id)]
    if accum_dq:
        launches.append(launch.backward_convert_dq(problem, kernel_dim, config.dkdv, t, limits, device_id))
    else:
        launches.append(launch.backward_dq(problem, kernel_dim, config.dq, t, limits, device_id))
    return Plan(buffers, launches, BACKWARD_RESULTS, limits, generation)


# Per thread: a plan's parameter buffers are written on every call, so threads never share one.
_local = threading.local()


def key(kind: str, arrays: Sequence[Any], options: tuple, device_id: int) -> tuple:
    """kind ("fwd", "bwd"), device, the caller's options as given, and each array's signature."""
    return (kind, device_id, options, *map(array_signature, arrays))


def find(kind: str, arrays: Sequence[Any], options: tuple, unsupported: tuple) -> Plan | None:
    """The cached plan that serves this call as it is, or None (the call takes the full path).

    unsupported is (softcap, alibi_slopes, dropout_p, seed): plans are only made without them.
    A hit needs, beyond the key: no forced config, every array on the current device (where
    the outputs are allocated) with a 16-byte aligned pointer (the full path would copy it).
    """
    plans = getattr(_local, "plans", None)
    if not plans or selection.is_forced():
        return None
    try:
        softcap, alibi_slopes, dropout_p, seed = unsupported
        if not (alibi_slopes is None and seed is None and softcap == 0 and dropout_p == 0):
            return None
        device_id = current_device_id()
        plan = plans.get(key(kind, arrays, options, device_id))
        if plan is None:
            return None
        for array in arrays:
            memory = array.data
            if memory.ptr % POINTER_ALIGN or memory.device_id != device_id:
                return None
    except Exception:  # odd arguments (unhashable options, an ambiguous ==): the full path reports them
        return None
    return plan if plan.is_current() else None


def keep(plan: Plan, problem: Problem, kind: str, inputs: Sequence[Any], options: tuple, ready: Sequence[Any],
         device_id: int) -> None:
    """Cache plan for repeat calls, if it can serve them unchanged: every input was a CuPy array
    that reached the kernels as it was (ready[i] is inputs[i]: not copied, padded or moved), no
    config was forced, and no dimension is zero (such calls are cheap and their own special case)."""
    ndarray = require_cupy().ndarray
    if selection.is_forced() or 0 in (problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q):
        return
    if not all(type(x) is ndarray and r is x for x, r in zip(inputs, ready, strict=True)):
        return
    plans = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = {}
    if len(plans) >= MAX_PLANS:
        plans.clear()
    try:
        plans[key(kind, inputs, options, device_id)] = plan
    except TypeError:  # unhashable options (a list as window_size): served by the full path each time
        pass


def clear() -> None:
    """Forget this thread's plans (tests, and timing the full path in scripts/host_overhead.py)."""
    _local.plans = {}
