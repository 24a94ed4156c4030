"""Tensor maps for Hopper's bulk tensor copies (TMA): the 128-byte descriptor that
cp.async.bulk.tensor reads to copy a box of a tensor between global and shared memory.

Used by the Hopper forward with bulk tensor copies (kernels/flash_fwd_tma.py). The driver encodes the
descriptor (cuTensorMapEncodeTiled). CuPy does not wrap that call, and cuda-bindings would be a
dependency of its own, so it is called through ctypes from libcuda, which every CUDA driver
installs. Only what a descriptor can describe is encoded: describe() says why not otherwise, so
that a caller can take the cp.async path instead (a strided view, say).

Dimensions and boxes are listed innermost first, as the driver wants them: a row-major (rows,
cols) matrix is dims (cols, rows), and its row stride is the one stride given, in bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass
from typing import Any

# CUtensorMapDataType, CUtensorMapSwizzle (cuda.h): the values the driver takes.
DATA_TYPES = {"float16": 6, "bfloat16": 9}
SWIZZLE_CODES = {0: 0, 32: 1, 64: 2, 128: 3}  # swizzle span in bytes -> CU_TENSOR_MAP_SWIZZLE_*
L2_PROMOTION_128B = 2  # CU_TENSOR_MAP_L2_PROMOTION_L2_128B
DESCRIPTOR_BYTES = 128  # sizeof(CUtensorMap), aligned to 64 bytes
# The driver's limits on a tiled map (cuTensorMapEncodeTiled's documentation).
MAX_RANK, MAX_BOX, MAX_DIM, MAX_STRIDE = 5, 256, 1 << 32, 1 << 40
ALIGNMENT = 16  # bytes: the global address and every stride


@dataclass(frozen=True)
class TiledMap:
    """What one descriptor describes: a tensor of `dims` elements of `dtype` (innermost first)
    whose dimension i + 1 lies strides[i] bytes apart, copied `box` elements at a time into
    shared memory swizzled over `swizzle` bytes (0: not swizzled)."""

    dtype: str
    dims: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int = 0

    @property
    def itemsize(self) -> int:
        return 2  # float16 and bfloat16

    def box_bytes(self) -> int:
        """Bytes one copy lands in shared memory (what its mbarrier expects)."""
        return self.itemsize * math.prod(self.box)


def why_not(tmap: TiledMap, address: int) -> str | None:
    """Why a descriptor cannot describe tmap at `address`, or None when it can."""
    rank = len(tmap.dims)
    if tmap.dtype not in DATA_TYPES:
        return f"dtype {tmap.dtype} has no tensor map type here (float16 or bfloat16)"
    if not 1 <= rank <= MAX_RANK:
        return f"rank {rank} is outside 1..{MAX_RANK}"
    if len(tmap.strides) != rank - 1 or len(tmap.box) != rank:
        return f"{rank} dims need {rank - 1} strides and {rank} box extents, got {tmap.strides} and {tmap.box}"
    if address % ALIGNMENT:
        return f"the address is not a multiple of {ALIGNMENT} bytes"
    if any(not 1 <= d <= MAX_DIM for d in tmap.dims):
        return f"dims {tmap.dims} must each be in 1..2^32"
    if any(s <= 0 or s % ALIGNMENT or s >= MAX_STRIDE for s in tmap.strides):
        return f"strides {tmap.strides} (bytes) must each be a positive multiple of {ALIGNMENT} below 2^40"
    if any(not 1 <= b <= MAX_BOX for b in tmap.box):  # a box may reach past the dims: those elements read 0
        return f"box {tmap.box} must have extents in 1..{MAX_BOX}"
    inner_bytes = tmap.box[0] * tmap.itemsize
    if inner_bytes % ALIGNMENT:
        return f"the box's inner extent is {inner_bytes} bytes, not a multiple of {ALIGNMENT}"
    if tmap.swizzle not in SWIZZLE_CODES:
        return f"swizzle {tmap.swizzle} is not one of {sorted(SWIZZLE_CODES)} bytes"
    if tmap.swizzle and inner_bytes > tmap.swizzle:
        return f"the box's inner extent ({inner_bytes} bytes) exceeds the {tmap.swizzle}-byte swizzle span"
    return None


def describe(array: Any, box: tuple[int, ...], swizzle: int = 0) -> TiledMap | str:
    """The TiledMap of a CuPy array (box in the array's own axis order, outermost first), or why
    none: its last axis must be contiguous and every other stride a multiple of 16 bytes. An
    axis of extent 1 is only ever read at index 0, so whatever stride it has (CuPy gives such
    axes any, 0 included) is replaced by one the driver takes: its inner neighbour's span."""
    dtype = str(array.dtype)
    if len(box) != array.ndim:
        return f"box {box} has {len(box)} extents for an array of {array.ndim} axes"
    if array.ndim == 0 or array.shape[-1] > 1 and array.strides[-1] != array.itemsize:
        return "the last axis is not contiguous"
    strides = [array.itemsize] * array.ndim
    for axis in range(array.ndim - 2, -1, -1):
        given = array.strides[axis]
        strides[axis] = given if array.shape[axis] > 1 else strides[axis + 1] * max(array.shape[axis + 1], 1)
    if any(s < 0 for s in strides):
        return f"strides {array.strides} include a negative one"
    tmap = TiledMap(dtype, tuple(reversed(array.shape)), tuple(reversed(strides[:-1])), tuple(reversed(box)), swizzle)
    reason = why_not(tmap, int(array.data.ptr))
    return reason if reason is not None else tmap


@functools.lru_cache(maxsize=1)
def _encoder() -> Any:
    """libcuda's cuTensorMapEncodeTiled, typed."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        library = ctypes.CDLL(name)
    except OSError as exc:
        raise RuntimeError(f"the CUDA driver library ({name}) does not load: {exc}") from exc
    encode = getattr(library, "cuTensorMapEncodeTiled", None)
    if encode is None:
        raise RuntimeError("the CUDA driver has no cuTensorMapEncodeTiled (a driver for CUDA 12 or newer has it)")
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    encode.restype = ctypes.c_int
    return encode


def encode(tmap: TiledMap, address: int) -> bytes:
    """The 128-byte descriptor of tmap at device address `address` (to pass by value as a
    __grid_constant__ kernel parameter). Raises ValueError for what why_not() refuses and
    RuntimeError when the driver refuses."""
    reason = why_not(tmap, address)
    if reason is not None:
        raise ValueError(f"no tensor map for {tmap}: {reason}")
    rank = len(tmap.dims)
    storage = ctypes.create_string_buffer(DESCRIPTOR_BYTES + 64)
    aligned = (ctypes.addressof(storage) + 63) // 64 * 64  # the driver writes a 64-byte-aligned CUtensorMap
    dims = (ctypes.c_uint64 * rank)(*tmap.dims)
    strides = (ctypes.c_uint64 * max(rank - 1, 1))(*tmap.strides)
    box = (ctypes.c_uint32 * rank)(*tmap.box)
    element_strides = (ctypes.c_uint32 * rank)(*([1] * rank))
    status = _encoder()(aligned, DATA_TYPES[tmap.dtype], rank, address, dims, strides, box, element_strides,
                        0, SWIZZLE_CODES[tmap.swizzle], L2_PROMOTION_128B, 0)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {status} for {tmap}")
    return ctypes.string_at(aligned, DESCRIPTOR_BYTES)
