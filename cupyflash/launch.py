"""Grid, block, shared memory and typed arguments of every kernel: the only caller of kernels.

Each launcher is written to be read beside the kernel's C++ signature. CuPy passes a Python
int as 64 bits and a float as a double, so every scalar is an explicit numpy type; arrays
pass as their device pointers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from . import build
from .config import BwdConfig, DkdvConfig, TileConfig
from .device import DeviceLimits
from .problem import Problem

ELEMENT = {"float16": "cf::Half", "bfloat16": "cf::BFloat16"}
LOG2_E = math.log2(math.e)
DELTA_ROWS_PER_BLOCK, DELTA_THREADS = 16, 128  # kDeltaRows, kDeltaThreads in flash_bwd_prep.cu
CONVERT_THREADS, CHUNK = 256, 8  # kConvertThreads, kChunk


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


def _strides(array: Any) -> tuple[np.int64, np.int64, np.int64]:
    """(batch, row, head) strides in elements of a (batch, seqlen, heads, dim) array."""
    return _element_strides(array.strides, array.itemsize)


# Memoized: attention() is called in loops with the same shapes, and building numpy scalars
# costs microseconds each (host time that short sequences feel).
@functools.lru_cache(maxsize=256)
def _element_strides(strides: tuple[int, ...], itemsize: int) -> tuple[np.int64, np.int64, np.int64]:
    return tuple(np.int64(s // itemsize) for s in strides[:3])


@functools.lru_cache(maxsize=256)
def _shape_args(p: Problem, head_dim: int) -> tuple[np.int32, ...]:
    return (np.int32(p.seqlen_q), np.int32(p.seqlen_k), np.int32(p.heads_q), np.int32(p.group_size),
            np.int32(head_dim), np.int32(p.window[0]), np.int32(p.window[1]))


def _function(spec: build.KernelSpec, limits: DeviceLimits, device_id: int, smem_bytes: int = 0) -> Any:
    return build.load_function(spec, device_id, limits.arch, smem_bytes)


def _launch(function: Any, grid: tuple[int, int, int], threads: int, args: tuple, smem: int, stream: Any) -> None:
    if 0 in grid:  # an empty tensor: nothing to compute (a zero grid is a launch error)
        return
    function(grid, (threads, 1, 1), args, shared_mem=smem, stream=stream)


def forward(p: Problem, kernel_dim: int, cfg: TileConfig, q: Any, k: Any, v: Any, out: Any, lse: Any,
            limits: DeviceLimits, device_id: int, stream: Any) -> None:
    """flash_fwd: out (like q) and lse (batch, heads_q, seqlen_q) float32, both preallocated."""
    smem = cfg.smem_bytes(kernel_dim, "fwd")
    function = _function(fwd_spec(p.dtype, kernel_dim, cfg), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_q / cfg.block_m), p.heads_q, p.batch)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            *_shape_args(p, q.shape[3]), np.float32(p.softmax_scale * LOG2_E))
    _launch(function, grid, cfg.num_warps * 32, args, smem, stream)


def backward_delta(p: Problem, out: Any, dout: Any, delta: Any, limits: DeviceLimits, device_id: int,
                   stream: Any) -> None:
    """flash_bwd_delta: delta = rowsum(dout * out), float32 (batch, heads_q, seqlen_q)."""
    function = _function(prep_spec(p.dtype, "flash_bwd_delta"), limits, device_id)
    grid = (math.ceil(p.seqlen_q / DELTA_ROWS_PER_BLOCK), p.heads_q, p.batch)
    args = (out, dout, delta, *_strides(out), *_strides(dout), np.int32(p.seqlen_q), np.int32(p.heads_q),
            np.int32(out.shape[3]))
    _launch(function, grid, DELTA_THREADS, args, 0, stream)


def backward_dkdv(p: Problem, kernel_dim: int, cfg: BwdConfig, accum_dq: bool, tensors: dict[str, Any],
                  limits: DeviceLimits, device_id: int, stream: Any) -> None:
    """flash_bwd_dkdv: dk, dv; with accum_dq also adds dQ / softmax_scale into tensors["dq_accum"]."""
    t = tensors
    smem = cfg.dkdv.smem_bytes(kernel_dim)
    function = _function(dkdv_spec(p.dtype, kernel_dim, cfg.dkdv, accum_dq), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_k / cfg.dkdv.block_n), p.heads_kv, p.batch)
    dq_accum = t["dq_accum"] if accum_dq else np.uint64(0)  # a null pointer when unused
    dqa_strides = _strides(t["dq_accum"]) if accum_dq else (np.int64(0),) * 3
    args = (t["q"], t["k"], t["v"], t["dout"], t["lse"], t["delta"], dq_accum, t["dk"], t["dv"],
            *_strides(t["q"]), *_strides(t["k"]), *_strides(t["v"]), *_strides(t["dout"]), *_strides(t["dk"]),
            *_strides(t["dv"]), *dqa_strides, *_shape_args(p, t["q"].shape[3]),
            np.float32(p.softmax_scale * LOG2_E), np.float32(p.softmax_scale))
    _launch(function, grid, cfg.dkdv.num_warps * 32, args, smem, stream)


def backward_dq(p: Problem, kernel_dim: int, cfg: TileConfig, tensors: dict[str, Any], limits: DeviceLimits,
                device_id: int, stream: Any) -> None:
    """flash_bwd_dq: dq (like q) in its own pass, deterministic."""
    t = tensors
    smem = cfg.smem_bytes(kernel_dim, "dq")
    function = _function(dq_spec(p.dtype, kernel_dim, cfg), limits, device_id, smem)
    grid = (math.ceil(p.seqlen_q / cfg.block_m), p.heads_q, p.batch)
    args = (t["q"], t["k"], t["v"], t["dout"], t["lse"], t["delta"], t["dq"], *_strides(t["q"]),
            *_strides(t["k"]), *_strides(t["v"]), *_strides(t["dout"]), *_strides(t["dq"]),
            *_shape_args(p, t["q"].shape[3]), np.float32(p.softmax_scale * LOG2_E), np.float32(p.softmax_scale))
    _launch(function, grid, cfg.num_warps * 32, args, smem, stream)


def backward_convert_dq(p: Problem, dq_accum: Any, dq: Any, limits: DeviceLimits, device_id: int,
                        stream: Any) -> None:
    """flash_bwd_convert_dq: dq = softmax_scale * dq_accum, both contiguous."""
    function = _function(prep_spec(p.dtype, "flash_bwd_convert_dq"), limits, device_id)
    n_elements = dq.size
    grid = (math.ceil(n_elements / CHUNK / CONVERT_THREADS), 1, 1)
    args = (dq_accum, dq, np.int64(n_elements), np.float32(p.softmax_scale))
    _launch(function, grid, CONVERT_THREADS, args, 0, stream)
