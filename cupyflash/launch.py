"""Grid, block, shared memory and typed arguments of every kernel: the only caller of kernels.

Each launcher below is written to be read beside the kernel's C++ signature. It returns a
`Launch`: the loaded kernel, its grid, block and shared memory, and its arguments packed once
into a parameter buffer. Arrays appear in the argument list by name ("q", "dk", ...): their
slots are the only part of the buffer written per call, with the device pointer of the array
of that name. Every scalar is an explicit numpy type of the C++ parameter's width.
plan.py keeps Launches for repeat calls; the first call runs them the same way.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any, Mapping

import numpy as np

from . import build
from .config import BwdConfig, DkdvConfig, TileConfig
from .device import DeviceLimits, require_cupy
from .problem import LOG2_E, Problem  # softmax_scale * LOG2_E is checked there to fit float32

ELEMENT = {"float16": "cf::Half", "bfloat16": "cf::BFloat16"}
DELTA_ROWS_PER_BLOCK, DELTA_THREADS = 16, 128  # kDeltaRows, kDeltaThreads in flash_bwd_prep.cu
CONVERT_THREADS, CHUNK = 256, 8  # kConvertThreads, kChunk
DQ_UNIT_ROWS, DQ_UNIT_COLS = 64, 32  # DqUnits::kRows, kCols (traits.cuh)


def dq_accum_shape(p: Problem, kernel_dim: int, dkdv: DkdvConfig, q_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The float32 dQ accumulator the dK/dV kernel adds into: like q for the mma.sync kernel; for
    the Hopper one, DqUnits (traits.cuh), [batch][heads_q][ceil(seqlen_q / 64)][kernel_dim / 32][64][32]."""
    if not dkdv.wgmma:
        return q_shape
    return (p.batch, p.heads_q, math.ceil(p.seqlen_q / DQ_UNIT_ROWS), kernel_dim // DQ_UNIT_COLS, DQ_UNIT_ROWS,
            DQ_UNIT_COLS)


def convert_dq_entry(dkdv: DkdvConfig) -> str:
    """The kernel that turns the dQ accumulator of this dK/dV kernel into dq (dq_accum_shape)."""
    return "flash_bwd_convert_dq_tiled" if dkdv.wgmma else "flash_bwd_convert_dq"


def _defines(dtype: str, **values: int) -> tuple[tuple[str, str], ...]:
    return (("CF_ELEMENT", ELEMENT[dtype]),) + tuple((f"CF_{k.upper()}", str(int(v))) for k, v in values.items())


@functools.lru_cache(maxsize=None)  # one spec per variant, built once
def fwd_spec(dtype: str, head_dim: int, cfg: TileConfig) -> build.KernelSpec:
    if cfg.wgmma:  # block_m follows from num_warps (64 rows per warpgroup)
        return build.KernelSpec("flash_fwd_sm90.cu", "flash_fwd_sm90", _defines(
            dtype, head_dim=head_dim, block_n=cfg.block_n, num_warps=cfg.num_warps, stages=cfg.stages,
            smem_bytes=cfg.smem_bytes(head_dim, "fwd")), arch_suffix="a")
    return build.KernelSpec("flash_fwd.cu", "flash_fwd", _defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, smem_bytes=cfg.smem_bytes(head_dim, "fwd")))


@functools.lru_cache(maxsize=None)
def dq_spec(dtype: str, head_dim: int, cfg: TileConfig) -> build.KernelSpec:
    return build.KernelSpec("flash_bwd_dq.cu", "flash_bwd_dq", _defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, smem_bytes=cfg.smem_bytes(head_dim, "dq")))


@functools.lru_cache(maxsize=None)
def dkdv_spec(dtype: str, head_dim: int, cfg: DkdvConfig, accum_dq: bool) -> build.KernelSpec:
    if cfg.wgmma:  # block_n follows from num_warps (64 keys per warpgroup)
        return build.KernelSpec("flash_bwd_dkdv_sm90.cu", "flash_bwd_dkdv_sm90", _defines(
            dtype, head_dim=head_dim, block_m=cfg.block_m, num_warps=cfg.num_warps, stages=cfg.stages,
            accum_dq=accum_dq, smem_bytes=cfg.smem_bytes(head_dim)), arch_suffix="a")
    return build.KernelSpec("flash_bwd_dkdv.cu", "flash_bwd_dkdv", _defines(
        dtype, head_dim=head_dim, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
        stages=cfg.stages, warps_d=cfg.warps_d, accum_dq=accum_dq, smem_bytes=cfg.smem_bytes(head_dim)))


@functools.lru_cache(maxsize=None)
def prep_spec(dtype: str, entry: str) -> build.KernelSpec:
    return build.KernelSpec("flash_bwd_prep.cu", entry, _defines(dtype))


# The C++ parameter type of each numpy type a packed argument may have (i64 strides, int sizes,
# float scales, u64 for a null pointer), as a struct code that fills one 8-byte slot from its
# start: "i4x" is an int and 4 pad bytes. A Python int or float would have no width of its own.
SLOT_FORMATS = {np.int64: "q", np.int32: "i4x", np.float32: "f4x", np.uint64: "Q"}
SLOT_BYTES = 8  # one slot per argument, wide enough for a pointer or an i64


def pack_arguments(args: tuple) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, str], ...]]:
    """The kernel parameter buffer of an argument list: (values, pointers, array slots).

    values holds one 8-byte slot per argument, the scalar's bytes at the start of its slot, in
    the host's byte order; pointers[i] is the address of slot i, so pointers is the `void**`
    that cuLaunchKernel reads (it copies sizeof(parameter) bytes from each address). An
    argument given as a string names an array; its (index, name) is returned and its slot,
    zero here, is filled per call by Launch.run.
    """
    formats, scalars, array_slots = [], [], []
    for index, arg in enumerate(args):
        if isinstance(arg, str):
            formats.append("Q")
            scalars.append(0)
            array_slots.append((index, arg))
        elif type(arg) in SLOT_FORMATS:
            formats.append(SLOT_FORMATS[type(arg)])
            scalars.append(arg)
        else:
            raise TypeError(f"kernel argument {index} is {type(arg).__name__} {arg!r}; pass an array name or one "
                            f"of {[t.__name__ for t in SLOT_FORMATS]}, the width of the C++ parameter")
    values = np.zeros(len(args), np.uint64)
    struct.pack_into("=" + "".join(formats), values, 0, *scalars)  # "=": native order, no padding
    pointers = np.uint64(values.ctypes.data) + np.uint64(SLOT_BYTES) * np.arange(len(args), dtype=np.uint64)
    return values, pointers, tuple(array_slots)


class Launch:
    """One kernel launch with everything but the array pointers decided."""

    __slots__ = ("function", "grid", "block", "smem", "args", "values", "pointers", "array_slots", "_head",
                 "_params", "_launch_kernel")

    def __init__(self, function: Any, grid: tuple[int, int, int], threads: int, smem: int, args: tuple) -> None:
        self.function = function  # a cupy Function; holding it keeps its module loaded
        self.grid, self.block, self.smem = grid, (threads, 1, 1), smem
        self.args = args  # the template: array names and typed scalars, for reading and tests
        self.values, self.pointers, self.array_slots = pack_arguments(args)
        # cuLaunchKernel's arguments before the stream, and the void** after it, looked up once
        self._head = (function.ptr, *grid, threads, 1, 1, smem)
        self._params = self.pointers.ctypes.data
        self._launch_kernel = require_cupy().cuda.driver.launchKernel

    def write_pointers(self, arrays: Mapping[str, Any]) -> None:
        values = self.values
        for index, name in self.array_slots:
            values[index] = arrays[name].data.ptr

    def run(self, arrays: Mapping[str, Any], stream_ptr: int) -> None:
        """Queue the kernel on the stream. cuLaunchKernel copies the parameters before it returns,
        so the buffer may be rewritten at once (it is never shared between threads: plan.py)."""
        self.write_pointers(arrays)
        self._launch_kernel(*self._head, stream_ptr, self._params, 0)


def _strides(array: Any) -> tuple[np.int64, np.int64, np.int64]:
    """(batch, row, head) strides in elements of a (batch, seqlen, heads, dim) array."""
    return _element_strides(array.strides, array.itemsize)


# Memoized: calls that plan.py cannot serve from a cached plan (DLPack or NumPy inputs, a forced
# config) build their launches every time, and numpy scalars cost about 0.3 us each.
@functools.lru_cache(maxsize=256)
def _element_strides(strides: tuple[int, ...], itemsize: int) -> tuple[np.int64, np.int64, np.int64]:
    return tuple(np.int64(s // itemsize) for s in strides[:3])


@functools.lru_cache(maxsize=256)
def _shape_args(p: Problem, head_dim: int) -> tuple[np.int32, ...]:
    return (np.int32(p.seqlen_q), np.int32(p.seqlen_k), np.int32(p.heads_q), np.int32(p.group_size),
            np.int32(head_dim), np.int32(p.window[0]), np.int32(p.window[1]))


def _function(spec: build.KernelSpec, limits: DeviceLimits, device_id: int, smem_bytes: int = 0) -> Any:
    return build.load_function(spec, device_id, limits.arch, smem_bytes)


# The launchers: t maps array names to arrays (inputs, and the outputs and temporaries plan.py
# allocated); their strides and sizes are read here, once per plan.

def forward(p: Problem, kernel_dim: int, cfg: TileConfig, t: Mapping[str, Any], limits: DeviceLimits,
            device_id: int) -> Launch:
    """flash_fwd: out (like q) and lse (batch, heads_q, seqlen_q) float32."""
    smem = cfg.smem_bytes(kernel_dim, "fwd")
    function = _function(fwd_spec(p.dtype, kernel_dim, cfg), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_q / cfg.block_m), p.heads_q, p.batch)
    args = ("q", "k", "v", "out", "lse", *_strides(t["q"]), *_strides(t["k"]), *_strides(t["v"]),
            *_strides(t["out"]), *_shape_args(p, t["q"].shape[3]), np.float32(p.softmax_scale * LOG2_E))
    return Launch(function, grid, cfg.num_warps * 32, smem, args)


def backward_delta(p: Problem, t: Mapping[str, Any], limits: DeviceLimits, device_id: int) -> Launch:
    """flash_bwd_delta: delta = rowsum(dout * out), float32 (batch, heads_q, seqlen_q)."""
    function = _function(prep_spec(p.dtype, "flash_bwd_delta"), limits, device_id)
    grid = (math.ceil(p.seqlen_q / DELTA_ROWS_PER_BLOCK), p.heads_q, p.batch)
    args = ("out", "dout", "delta", *_strides(t["out"]), *_strides(t["dout"]), np.int32(p.seqlen_q),
            np.int32(p.heads_q), np.int32(t["out"].shape[3]))
    return Launch(function, grid, DELTA_THREADS, 0, args)


def backward_dkdv(p: Problem, kernel_dim: int, cfg: BwdConfig, accum_dq: bool, t: Mapping[str, Any],
                  limits: DeviceLimits, device_id: int) -> Launch:
    """flash_bwd_dkdv: dk, dv; with accum_dq also adds dQ / softmax_scale into t["dq_accum"]."""
    smem = cfg.dkdv.smem_bytes(kernel_dim)
    function = _function(dkdv_spec(p.dtype, kernel_dim, cfg.dkdv, accum_dq), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_k / cfg.dkdv.block_n), p.heads_kv, p.batch)
    dq_accum = "dq_accum" if accum_dq else np.uint64(0)  # a null pointer when unused
    # The Hopper kernel's dq_accum has its own layout (dq_accum_shape), without strides.
    dqa_strides = () if cfg.dkdv.wgmma else _strides(t["dq_accum"]) if accum_dq else (np.int64(0),) * 3
    args = ("q", "k", "v", "dout", "lse", "delta", dq_accum, "dk", "dv",
            *_strides(t["q"]), *_strides(t["k"]), *_strides(t["v"]), *_strides(t["dout"]), *_strides(t["dk"]),
            *_strides(t["dv"]), *dqa_strides, *_shape_args(p, t["q"].shape[3]),
            np.float32(p.softmax_scale * LOG2_E), np.float32(p.softmax_scale))
    return Launch(function, grid, cfg.dkdv.num_warps * 32, smem, args)


def backward_dq(p: Problem, kernel_dim: int, cfg: TileConfig, t: Mapping[str, Any], limits: DeviceLimits,
                device_id: int) -> Launch:
    """flash_bwd_dq: dq (like q) in its own pass, deterministic."""
    smem = cfg.smem_bytes(kernel_dim, "dq")
    function = _function(dq_spec(p.dtype, kernel_dim, cfg), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_q / cfg.block_m), p.heads_q, p.batch)
    args = ("q", "k", "v", "dout", "lse", "delta", "dq", *_strides(t["q"]), *_strides(t["k"]), *_strides(t["v"]),
            *_strides(t["dout"]), *_strides(t["dq"]), *_shape_args(p, t["q"].shape[3]),
            np.float32(p.softmax_scale * LOG2_E), np.float32(p.softmax_scale))
    return Launch(function, grid, cfg.num_warps * 32, smem, args)


def backward_convert_dq(p: Problem, kernel_dim: int, dkdv: DkdvConfig, t: Mapping[str, Any], limits: DeviceLimits,
                        device_id: int) -> Launch:
    """dq = softmax_scale * dq_accum, in the accumulator's layout (convert_dq_entry):
    flash_bwd_convert_dq (both contiguous, the same shape) or flash_bwd_convert_dq_tiled."""
    entry = convert_dq_entry(dkdv)
    function = _function(prep_spec(p.dtype, entry), limits, device_id)
    if entry == "flash_bwd_convert_dq":
        n_elements = t["dq"].size
        grid = (math.ceil(n_elements / CHUNK / CONVERT_THREADS), 1, 1)
        args = ("dq_accum", "dq", np.int64(n_elements), np.float32(p.softmax_scale))
    else:  # one block row per query row, blocks across (heads_q, head_dim / 4), one z per batch
        head_dim = t["dq"].shape[3]
        grid = (p.seqlen_q, math.ceil(p.heads_q * head_dim // 4 / CONVERT_THREADS), p.batch)
        args = ("dq_accum", "dq", *_strides(t["dq"]), np.int32(p.seqlen_q), np.int32(p.heads_q),
                np.int32(head_dim), np.int32(kernel_dim // DQ_UNIT_COLS), np.float32(p.softmax_scale))
    return Launch(function, grid, CONVERT_THREADS, 0, args)
