"""Which kernels a call runs, with which configs, and the plan that runs them again.

The decision, in order: a config pinned by `forced(...)` (the autotuner and tests), else the
tuned winner of the problem's bucket (tuning.py), else the first fitting row of the kernel
families' heuristic tables (kernels/*.py), Hopper families first. `forward_kernels` and
`backward_kernels` are the one list of kernels a call runs; plans, the autotuner and the bench
all read it.

A training or inference loop calls attention() with the same shapes again and again. The first
call of a kind checks everything (problem.py), picks the configs, loads the kernels and fills
the parameter block (launch.py); its Plan keeps the outcome: the outputs and temporaries to
allocate, the block and one Launch per kernel. A later call whose arrays have the same type,
shape, strides and dtype, with the same options, on the same device, finds that plan (find)
and only allocates, writes the array pointers into the block and launches (Plan.run).
scripts/host_overhead.py times both paths. The first call runs its plan the same way
(Plan.launch), so there is one launch path.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from . import build, launch, tuning
from .arrays import POINTER_ALIGN
from .device import DeviceLimits, current_device_id, device_limits, require_cupy
from .kernels import (flash_bwd_dkdv, flash_bwd_dkdv_sm90, flash_bwd_dq, flash_bwd_dq_sm90, flash_bwd_prep, flash_fwd,
                      flash_fwd_sm90, flash_fwd_tma)
from .kernels.common import no_config_error
from .problem import Problem, array_signature, is_text_or_flag

# Tried in this order: the first that has a fitting row (and, for a packed batch, runs those).
FORWARD_FAMILIES = (flash_fwd_tma, flash_fwd_sm90, flash_fwd)
DKDV_FAMILIES = (flash_bwd_dkdv_sm90, flash_bwd_dkdv)
DQ_FAMILIES = (flash_bwd_dq_sm90, flash_bwd_dq)  # the dQ pass of deterministic=True
FAMILIES = {family.ENTRY: family for family in (*FORWARD_FAMILIES, *DKDV_FAMILIES, *DQ_FAMILIES)}
FwdConfig = flash_fwd.FwdConfig | flash_fwd_sm90.Sm90FwdConfig | flash_fwd_tma.TmaFwdConfig
DkdvConfig = flash_bwd_dkdv.DkdvConfig | flash_bwd_dkdv_sm90.Sm90DkdvConfig
DqConfig = flash_bwd_dq.DqConfig | flash_bwd_dq_sm90.Sm90DqConfig
FORWARD_RESULTS = ("out", "lse")
BACKWARD_RESULTS = ("dq", "dk", "dv")
MAX_PLANS = 256  # per thread; the cache is cleared when full, like the other memo caches


@dataclass(frozen=True)
class BwdConfig:
    """The backward pass: the dK/dV kernel, and how dQ is made. With dq_atomic, the dK/dV
    kernel adds dQ into a float32 buffer (fast, not bitwise repeatable) and a conversion kernel
    makes dq of it; without, the dQ kernel (`dq`) makes it in its own pass. attention_backward's
    deterministic=True forces the latter."""

    dkdv: DkdvConfig
    dq: DqConfig
    dq_atomic: bool = True

    def fits(self, head_dim: int, limits: DeviceLimits) -> bool:
        return self.dkdv.fits(head_dim, limits) and self.dq.fits(head_dim, limits)

    def to_dict(self) -> dict[str, Any]:
        return {"dkdv": self.dkdv.to_dict(), "dq": self.dq.to_dict(), "dq_atomic": self.dq_atomic}


def config_from_dict(data: dict[str, Any]) -> Any:
    """A config from its to_dict(): a kernel family's (named by "kernel") or a BwdConfig."""
    if "dkdv" in data:
        return BwdConfig(config_from_dict(data["dkdv"]), config_from_dict(data["dq"]), bool(data["dq_atomic"]))
    fields = dict(data)
    return FAMILIES[fields.pop("kernel")].CONFIG(**fields)


def family_of(config: Any) -> Any:
    """The module of a config's kernel family."""
    return FAMILIES[config.kernel]


# --------------------------------------------------------------------------- choosing configs

_override = threading.local()
_NOTHING_FORCED = (None, None)


@contextmanager
def forced(fwd: FwdConfig | None = None, bwd: BwdConfig | None = None) -> Iterator[None]:
    """Pin configs for the calls made inside (this thread only). Such calls neither use nor
    make cached plans, which hold a config."""
    previous = getattr(_override, "configs", _NOTHING_FORCED)
    _override.configs = (fwd, bwd)
    try:
        yield
    finally:
        _override.configs = previous


def is_forced() -> bool:
    return getattr(_override, "configs", _NOTHING_FORCED) != _NOTHING_FORCED


def _first_default(families: Sequence[Any], what: str, head_dim: int, limits: DeviceLimits) -> Any:
    """The default config of the first family that has one for head_dim on this device."""
    for family in families:
        config = family.default(head_dim, limits)
        if config is not None:
            return config
    raise no_config_error(what, head_dim, limits)


@functools.lru_cache(maxsize=None)  # pure in its (hashable) arguments; called on every full-path call
def default_fwd_config(head_dim: int, limits: DeviceLimits, varlen: bool = False,
                       tensor_maps: bool = True) -> FwdConfig:
    """The first fitting row of the families' tables; for a packed batch (varlen) or arrays a
    tensor map cannot describe (not tensor_maps), of the families that run those."""
    families = [family for family in FORWARD_FAMILIES
                if not (varlen and not getattr(family, "PACKED_BATCHES", True)
                        or hasattr(family, "tensor_maps") and not tensor_maps)]
    return _first_default(families, "forward", head_dim, limits)


@functools.lru_cache(maxsize=None)
def default_bwd_config(head_dim: int, limits: DeviceLimits) -> BwdConfig:
    dkdv = _first_default(DKDV_FAMILIES, "backward dK/dV", head_dim, limits)
    dq = _first_default(DQ_FAMILIES, "backward dQ", head_dim, limits)
    return BwdConfig(dkdv, dq, dq_atomic=dkdv.atomic_dq_by_default(head_dim))


def tuned_config(kind: str, problem: Problem, limits: DeviceLimits) -> Any:
    """The tuned config of the problem's bucket, if one is stored and fits this device, else None."""
    entry = tuning.lookup(kind, problem, problem.kernel_head_dim, limits)
    if entry is None:
        return None
    try:
        config = config_from_dict(entry)
        if kind == "bwd" and not isinstance(config, BwdConfig) or kind == "fwd" and isinstance(config, BwdConfig):
            raise ValueError(f"not a {kind} config")
    except (KeyError, TypeError, ValueError) as error:
        warnings.warn(f"ignoring malformed tuned config {entry!r}: {error}", RuntimeWarning, stacklevel=3)
        return None
    return config if config.fits(problem.kernel_head_dim, limits) else None


def choose(kind: str, problem: Problem, limits: DeviceLimits) -> Any:
    """The config a call of kind "fwd" (a family's config) or "bwd" (a BwdConfig) runs with."""
    pinned = getattr(_override, "configs", _NOTHING_FORCED)[0 if kind == "fwd" else 1]
    if pinned is not None:
        return pinned
    tuned = tuned_config(kind, problem, limits)
    if tuned is not None:
        return tuned
    if kind == "fwd":
        return default_fwd_config(problem.kernel_head_dim, limits, problem.varlen)
    return default_bwd_config(problem.kernel_head_dim, limits)


def fwd_candidates(head_dim: int, limits: DeviceLimits) -> list[FwdConfig]:
    """Every forward config of every family worth timing for head_dim on this device."""
    return [c for family in FORWARD_FAMILIES for c in family.candidates(head_dim, limits)]


def dkdv_candidates(head_dim: int, limits: DeviceLimits) -> list[DkdvConfig]:
    return [c for family in DKDV_FAMILIES for c in family.candidates(head_dim, limits)]


def dq_candidates(head_dim: int, limits: DeviceLimits) -> list[DqConfig]:
    return [c for family in DQ_FAMILIES for c in family.candidates(head_dim, limits)]


# --------------------------------------------------------------------------- the kernels of a call

class KernelCall(NamedTuple):
    """One kernel of a call: what to compile, and how to launch it."""

    spec: build.KernelSpec
    grid: tuple[int, int, int]
    threads: int
    smem: int  # dynamic shared memory, bytes


def forward_kernels(problem: Problem, config: FwdConfig) -> list[KernelCall]:
    """The forward pass: one kernel, of the config's family."""
    family, dim = family_of(config), problem.kernel_head_dim
    return [KernelCall(family.spec(problem.dtype, dim, config, variant=problem.variant),
                       family.grid(problem, config), config.threads, config.smem_bytes(dim))]


def atomic_dq(config: BwdConfig, deterministic: bool) -> bool:
    """Whether dQ is added by the dK/dV kernel (then converted), or made in its own pass."""
    return config.dq_atomic and not deterministic


def backward_kernels(problem: Problem, config: BwdConfig, deterministic: bool) -> list[KernelCall]:
    """The backward pass: (packed batches) zero the dK, dV rows of unused keys; delta; dK/dV; then
    the dQ conversion of the dK/dV kernel's accumulator (atomic dQ) or the dQ kernel (its own pass)."""
    dtype, dim, accum = problem.dtype, problem.kernel_head_dim, atomic_dq(config, deterministic)
    dkdv_family, variant = family_of(config.dkdv), problem.variant

    def prep(entry: str) -> KernelCall:
        return KernelCall(flash_bwd_prep.spec(dtype, entry, variant=variant), flash_bwd_prep.grid(problem, entry),
                          flash_bwd_prep.threads(entry), 0)

    calls = [prep(flash_bwd_prep.ZERO_UNUSED_KEYS)] if problem.varlen else []
    calls += [prep(flash_bwd_prep.DELTA),
              KernelCall(dkdv_family.spec(dtype, dim, config.dkdv, accum, variant=variant),
                         dkdv_family.grid(problem, config.dkdv), config.dkdv.threads, config.dkdv.smem_bytes(dim))]
    if accum:
        return calls + [prep(dkdv_family.CONVERT_ENTRY)]
    dq_family = family_of(config.dq)
    return calls + [KernelCall(dq_family.spec(dtype, dim, config.dq, variant=variant),
                               dq_family.grid(problem, config.dq), config.dq.threads, config.dq.smem_bytes(dim))]


# --------------------------------------------------------------------------- plans

class Buffer(NamedTuple):
    """An output or temporary the plan allocates on every call (C-contiguous, current device)."""

    name: str
    allocate: Callable[..., Any]  # cupy.empty, or cupy.zeros where the kernels accumulate into it
    shape: tuple[int, ...]
    dtype: Any


class Plan:
    """The buffers, parameter block and kernel launches of one call, built once per signature."""

    __slots__ = ("buffers", "params", "launches", "results", "limits", "generation", "recheck_at",
                 "_current_stream")

    def __init__(self, buffers: Sequence[Buffer], params: launch.ParamBlock | None,
                 launches: Sequence[launch.Launch], results: tuple[str, ...], limits: DeviceLimits,
                 generation: int) -> None:
        self.buffers, self.params = tuple(buffers), params
        # A grid with a zero dimension is a launch error; such a kernel has nothing to compute.
        self.launches = tuple(x for x in launches if 0 not in x.grid)
        self.results = results
        self.limits, self.generation = limits, generation  # the tuning entries the config came from
        self.recheck_at = time.monotonic() + tuning.RECHECK_SECONDS
        self._current_stream = require_cupy().cuda.get_current_stream

    def run(self, t: dict[str, Any]) -> tuple[Any, ...]:
        """A repeat call: t holds the inputs by name; the outputs are allocated and computed."""
        allocate(self.buffers, t)
        return self.launch(t)

    def launch(self, t: dict[str, Any]) -> tuple[Any, ...]:
        """Queue every kernel on the current stream; the results by name, from t."""
        if self.launches:
            self.params.write_pointers(t)
            stream_ptr = self._current_stream().ptr
            for kernel in self.launches:
                kernel.run(stream_ptr)
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


def allocate(buffers: Sequence[Buffer], t: dict[str, Any]) -> None:
    """Each buffer, allocated into t by its name."""
    for name, make, shape, dtype in buffers:
        t[name] = make(shape, dtype)


def load_launches(calls: Sequence[KernelCall], params: launch.ParamBlock, limits: DeviceLimits,
                  device_id: int) -> list[launch.Launch]:
    """Each call's kernel loaded (compiled first if need be), as a Launch reading params."""
    return [launch.Launch(build.load_function(call.spec, device_id, limits.arch, call.smem), call.grid,
                          call.threads, call.smem, params) for call in calls]


def build_forward(problem: Problem, t: dict[str, Any], device_id: int) -> Plan:
    """The plan of a forward call on the kernel-ready q, k, v in t. Allocates out and lse into t
    on the way: the parameter block reads their strides."""
    cupy, q = require_cupy(), t["q"]
    limits = device_limits(device_id)
    generation = tuning.generation()  # read before the lookup: a change during it makes the plan stale
    buffers = (Buffer("out", cupy.empty, q.shape, q.dtype),
               Buffer("lse", cupy.empty, problem.stats_shape, np.float32))
    allocate(buffers, t)
    if problem.is_empty:
        return Plan(buffers, None, (), FORWARD_RESULTS, limits, generation)
    params = launch.forward_params(problem, t)
    config = choose("fwd", problem, limits)
    family = family_of(config)
    reason = family.unsupported(problem) if hasattr(family, "unsupported") else None
    maps = None
    if reason is None and hasattr(family, "tensor_maps"):
        maps = family.tensor_maps(problem, t, config)  # or why an array has none
        reason = maps if isinstance(maps, str) else None
    if reason is not None:  # a config of a family that cannot run this call: the next family's
        if is_forced():
            raise ValueError(f"the forced forward config {config} cannot run {reason}")
        config = default_fwd_config(problem.kernel_head_dim, limits, problem.varlen, tensor_maps=False)
        maps = None
    if maps is not None:
        params = launch.TensorMapParams(params, maps)
    calls = forward_kernels(problem, config)
    return Plan(buffers, params, load_launches(calls, params, limits, device_id), FORWARD_RESULTS, limits, generation)


def build_backward(problem: Problem, t: dict[str, Any], deterministic: bool, device_id: int) -> Plan:
    """The plan of a backward call on the kernel-ready dout, q, k, v, out, lse in t (the kernels
    of backward_kernels). Allocates the gradients and temporaries into t on the way."""
    cupy, q, k = require_cupy(), t["q"], t["k"]
    limits = device_limits(device_id)
    generation = tuning.generation()
    if problem.batch == 0 or problem.heads_q == 0 or problem.seqlen_k == 0:
        # Nothing to attend to: every gradient is 0.
        buffers = [Buffer(name, cupy.zeros, like.shape, like.dtype) for name, like in (("dq", q), ("dk", k), ("dv", k))]
        allocate(buffers, t)
        return Plan(buffers, None, (), BACKWARD_RESULTS, limits, generation)
    config = choose("bwd", problem, limits)
    # Every dK, dV row is written: by the dK/dV kernel, or (keys no packed sequence uses) by
    # flash_bwd_zero_unused_keys before it.
    buffers = [Buffer("dq", cupy.empty, q.shape, q.dtype), Buffer("dk", cupy.empty, k.shape, k.dtype),
               Buffer("dv", cupy.empty, k.shape, k.dtype),
               Buffer("delta", cupy.empty, problem.stats_shape, np.float32),
               Buffer("lse_log2", cupy.empty, problem.stats_shape, np.float32)]
    if atomic_dq(config, deterministic):  # zeroed: the kernel adds into it
        buffers.append(Buffer("dq_accum", cupy.zeros, config.dkdv.dq_accum_shape(problem), np.float32))
    allocate(buffers, t)
    params = launch.backward_params(problem, t)
    calls = backward_kernels(problem, config, deterministic)
    return Plan(buffers, params, load_launches(calls, params, limits, device_id), BACKWARD_RESULTS, limits, generation)


# Per thread: a plan's parameter block is written on every call, so threads never share one.
_local = threading.local()


def key(kind: str, arrays: Sequence[Any], options: tuple, device_id: int) -> tuple:
    """kind ("fwd", "bwd"), device, the caller's options as given and their types, and each
    array's signature. The types, because True == 1.0 and hash(True) == hash(1.0): a plan made
    for softmax_scale=1.0 must not serve softmax_scale=True, which the full path rejects."""
    return (kind, device_id, options, tuple(map(type, options)), *map(array_signature, arrays))


def _is_zero(value: Any) -> bool:
    """0 or 0.0 (a plan serves only calls without softcap or dropout), but not False or
    np.False_: the full path rejects a flag there (problem.is_text_or_flag)."""
    return value == 0 and not is_text_or_flag(value)


def find(kind: str, arrays: Sequence[Any], options: tuple, unsupported: tuple) -> Plan | None:
    """The cached plan that serves this call as it is, or None (the call takes the full path).

    unsupported is (softcap, alibi_slopes, dropout_p, seed): plans are only made without them.
    A hit needs, beyond the key: no forced config, every array on the current device (where
    the outputs are allocated) with a 16-byte aligned pointer (the full path would copy it).
    """
    plans = getattr(_local, "plans", None)
    if not plans or is_forced():
        return None
    try:
        softcap, alibi_slopes, dropout_p, seed = unsupported
        if not (alibi_slopes is None and seed is None and _is_zero(softcap) and _is_zero(dropout_p)):
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
    that reached the kernels as it was (ready[i] is inputs[i], or for a packed batch's q, k, v the
    4-D view inputs[i][None]: not copied, padded or moved), no config was forced, and no
    dimension is zero (such calls are cheap and their own special case)."""
    ndarray = require_cupy().ndarray
    if is_forced() or 0 in (problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q):
        return
    if not all(type(x) is ndarray and _reached_as_is(x, r) for x, r in zip(inputs, ready, strict=True)):
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


def _reached_as_is(given: Any, ready: Any) -> bool:
    """ready is given, or given[None] (the same memory, shape and strides behind a batch of 1)."""
    if ready is given:
        return True
    return (ready.ndim == given.ndim + 1 and ready.shape == (1, *given.shape) and ready.strides[1:] == given.strides
            and ready.data.ptr == given.data.ptr)


def clear() -> None:
    """Forget this thread's plans (tests, and timing the full path in scripts/host_overhead.py)."""
    _local.plans = {}
