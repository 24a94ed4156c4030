"""The parameter blocks the kernels read, and the launch that hands one to a kernel.

Read beside kernels_cu/params.cuh: every forward kernel takes one FwdParams, every backward
kernel one BwdParams, as a single `__grid_constant__` argument. Their layout is written here
once, as NumPy structured dtypes (aligned like C structs). build.py passes `host_layout()` to
every compile, and params.cuh turns it into a static_assert per field offset, struct size and
shared constant: if this file and the header disagree, no kernel compiles.

A plan (plan.py) fills one ParamBlock per call signature: strides, lengths and scalars once,
with explicit NumPy types (a value that does not fit its C++ field raises). Only the array
pointers change between calls; ParamBlock.write_pointers puts them in, and every Launch of the
plan then queues its kernel with the same block (cuLaunchKernel copies it before returning).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from .device import require_cupy
from .problem import LOG2_E, Problem  # softmax_scale * LOG2_E is checked there to fit float32

# The C++ types of params.cuh's fields, with the NumPy type of their bytes (pointers are addresses).
SCALARS = {"cf::u16*": np.uint64, "float*": np.uint64, "const float*": np.uint64, "const int*": np.uint64,
           "const cf::u64*": np.uint64, "cf::i64": np.int64, "cf::u64": np.uint64, "int": np.int32, "float": np.float32}

# The structs of params.cuh, field by field, in declaration order: (name, C++ type or struct name).
STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {}
STRUCTS["Tensor16"] = (("ptr", "cf::u16*"), ("batch_stride", "cf::i64"), ("row_stride", "cf::i64"),
                       ("head_stride", "cf::i64"))
STRUCTS["NextFeatures"] = (
    ("cu_seqlens_q", "const int*"), ("cu_seqlens_k", "const int*"), ("seqused_k", "const int*"),
    ("block_table", "const int*"), ("block_table_batch_stride", "cf::i64"), ("page_size", "int"),
    ("num_splits", "int"), ("out_partial", "float*"), ("lse_partial", "float*"), ("softcap", "float"),
    ("alibi_slopes", "const float*"), ("rng_seed", "cf::u64"), ("rng_offset", "cf::u64"), ("dropout_p", "float"),
    ("total_q", "int"), ("total_k", "int"))
_SIZES = tuple((name, "int") for name in ("batch", "seqlen_q", "seqlen_k", "heads_q", "group_size", "head_dim",
                                          "window_left", "window_right"))
STRUCTS["FwdParams"] = (
    *((name, "Tensor16") for name in ("q", "k", "v", "out")), ("lse", "float*"), *_SIZES, ("scale_log2", "float"),
    ("next", "NextFeatures"))
STRUCTS["BwdParams"] = (
    *((name, "Tensor16") for name in ("q", "k", "v", "out", "dout", "dq", "dk", "dv")), ("lse", "const float*"),
    ("delta", "float*"), ("lse_log2", "float*"), ("dq_accum", "float*"), ("dq_accum_batch_stride", "cf::i64"),
    ("dq_accum_row_stride", "cf::i64"), ("dq_accum_head_stride", "cf::i64"), ("dq_accum_head_dim", "int"), *_SIZES,
    ("scale_log2", "float"), ("softmax_scale", "float"), ("next", "NextFeatures"))
STRUCTS["MergeParams"] = (
    ("part_table", "const cf::u64*"), ("in_batch_stride", "cf::i64"), ("in_row_stride", "cf::i64"),
    ("in_head_stride", "cf::i64"), ("out", "Tensor16"), ("lse", "float*"),
    *((name, "int") for name in ("num_parts", "batch", "seqlen_q", "heads_q", "head_dim")))

STRUCTS["DecodeParams"] = (
    *((name, "Tensor16") for name in ("q", "k_cache", "v_cache", "k_new", "v_new", "out")), ("lse", "float*"),
    ("out_partial", "float*"), ("lse_partial", "float*"), ("cache_seqlens", "const int*"),
    ("cache_batch_idx", "const int*"), ("block_table", "const int*"), ("block_table_batch_stride", "cf::i64"),
    *((name, "int") for name in ("batch", "seqlen_q", "heads_q", "group_size", "head_dim", "seqlen_new",
                                 "cache_seqlen", "capacity", "page_size", "num_pages", "batch_cache", "num_splits",
                                 "split_tiles", "window_left", "window_right")),
    ("scale_log2", "float"))


def _dtype(struct: str) -> np.dtype:
    fields = [(name, _dtype(kind) if kind in STRUCTS else SCALARS[kind]) for name, kind in STRUCTS[struct]]
    return np.dtype(fields, align=True)


DTYPES = {name: _dtype(name) for name in STRUCTS}

# Numbers the host sizes grids and buffers with; params.cuh defines them for the kernels.
SMEM_ALIGN_SLACK = 1024  # kSmemAlignSlack: the Hopper kernels align their shared struct to 1024 bytes
ZERO_THREADS, ZERO_BLOCKS_PER_GAP = 256, 16  # kZeroThreads, kZeroBlocksPerGap: flash_bwd_zero_unused_keys
DELTA_THREADS, DELTA_ROWS = 128, 16  # kDeltaThreads, kDeltaRows: flash_bwd_delta's block and rows
CONVERT_THREADS, CONVERT_CHUNK = 256, 8  # kConvertThreads, kConvertChunk: the dQ conversions
DQ_UNIT_ROWS, DQ_UNIT_COLS = 64, 32  # kDqUnitRows, kDqUnitCols: the Hopper dQ accumulator's units
MERGE_THREADS = 256  # kMergeThreads: flash_merge's block, one warp per query row
MERGE_ROWS_PER_BLOCK = MERGE_THREADS // 32  # kMergeRowsPerBlock
DECODE_WARPS, DECODE_BLOCK_N = 4, 64  # kDecodeWarps, kDecodeBlockN: flash_decode's block and key tile
APPEND_THREADS = 256  # kAppendThreads: flash_decode_append's block
COMBINE_THREADS = 256  # kCombineThreads: flash_decode_combine's block, one per query row
DECODE_MAX_SPLITS = 256  # kDecodeMaxSplits: the most key splits one decode call has
CONSTANTS = {"kSmemAlignSlack": SMEM_ALIGN_SLACK, "kZeroThreads": ZERO_THREADS,
             "kZeroBlocksPerGap": ZERO_BLOCKS_PER_GAP, "kDeltaThreads": DELTA_THREADS, "kDeltaRows": DELTA_ROWS,
             "kConvertThreads": CONVERT_THREADS, "kConvertChunk": CONVERT_CHUNK, "kDqUnitRows": DQ_UNIT_ROWS,
             "kDqUnitCols": DQ_UNIT_COLS, "kMergeThreads": MERGE_THREADS, "kMergeRowsPerBlock": MERGE_ROWS_PER_BLOCK,
             "kDecodeWarps": DECODE_WARPS, "kDecodeBlockN": DECODE_BLOCK_N, "kAppendThreads": APPEND_THREADS,
             "kCombineThreads": COMBINE_THREADS,
             "kDecodeMaxSplits": DECODE_MAX_SPLITS}


@functools.lru_cache(maxsize=None)  # part of every compile and cache key
def host_layout() -> str:
    """CF_HOST_LAYOUT, the checks params.cuh expands: each field's type, a constexpr probe of
    each struct whose fields get distinct values in this file's order with a check per field
    that it holds its own, each struct's size and alignment, and each shared constant."""
    checks = []
    for struct, dtype in DTYPES.items():
        checks += [f"CF_FIELD({struct}, {name}, {'cf::' + kind if kind in STRUCTS else kind})"
                   for name, kind in STRUCTS[struct]]
        values = _probe_values(struct, itertools.count(1), itertools.count(0))
        checks.append(f"CF_PROBE({struct}, {', '.join(init for init, _ in values)})")
        checks += [f"CF_AT({struct}, {name}{path}, {value})" for (name, _), (_, (path, value)) in
                   zip(STRUCTS[struct], values)]
        checks.append(f"CF_SIZE({struct}, {dtype.itemsize}, {dtype.alignment})")
    checks += [f"CF_VALUE({name}, {value})" for name, value in CONSTANTS.items()]
    return " ".join(checks)


_PROBE_TARGETS = {"cf::u16*": "cf::probe_u16", "float*": "cf::probe_f32", "const float*": "cf::probe_f32",
                  "const int*": "cf::probe_i32", "const cf::u64*": "cf::probe_u64"}


PROBE_POINTERS = 32  # kProbePointers: pointer fields per struct, nested ones included


def _probe_values(struct: str, numbers: Any, pointers: Any) -> list[tuple[str, tuple[str, str]]]:
    """Per field of struct: (its initializer, (the member path checked, the value it must hold)).
    Every value is distinct: a pointer gets the address of its own probe element, a number its
    own integer, a nested struct its own values (its first field is checked)."""
    values = []
    for _name, kind in STRUCTS[struct]:
        if kind in STRUCTS:
            inner = _probe_values(kind, numbers, pointers)
            first_path, first_value = inner[0][1]
            values.append(("{" + ", ".join(init for init, _ in inner) + "}",
                           (f".{STRUCTS[kind][0][0]}{first_path}", first_value)))
        elif kind in _PROBE_TARGETS:
            index = next(pointers)
            if index >= PROBE_POINTERS:
                raise ValueError(f"{struct} has more than {PROBE_POINTERS} pointer fields: raise kProbePointers")
            value = f"&{_PROBE_TARGETS[kind]}[{index}]"
            values.append((value, ("", value)))
        else:
            value = str(next(numbers))
            values.append((value, ("", value)))
    return values


def _element_strides(array: Any) -> tuple[int, int, int]:
    """(batch, row, head) strides in elements of a (batch, seqlen, heads, dim) array."""
    return tuple(s // array.itemsize for s in array.strides[:3])


def _zeros(kind: str) -> Any:
    """The all-zero value of a field of this kind, as np.array takes it (a tuple per struct)."""
    return tuple(_zeros(k) for _, k in STRUCTS[kind]) if kind in STRUCTS else 0


_FIELD_ZEROS = {struct: tuple((name, _zeros(kind)) for name, kind in fields) for struct, fields in STRUCTS.items()}
_PTR_OFFSET = DTYPES["Tensor16"].fields["ptr"][1]


class ParamBlock:
    """One FwdParams or BwdParams in host memory, and the arrays whose pointers it holds.

    values: field -> value, a Tensor16 field as (0, batch, row, head strides), `next` as a
    NextFeatures tuple; fields left out are zero. arrays: (field, array name) of each pointer
    field written per call; a Tensor16 field's is its ptr, and "next.<field>" names a field of
    NextFeatures. The record is made in one np.array call: field by field, the full path of a
    call spent ~40 us here."""

    __slots__ = ("struct", "record", "words", "address", "array_slots")

    def __init__(self, struct: str, values: Mapping[str, Any] | None = None,
                 arrays: Sequence[tuple[str, str]] = ()) -> None:
        self.struct = struct
        values = values or {}
        self.record = np.array([tuple(values.get(name, zero) for name, zero in _FIELD_ZEROS[struct])], DTYPES[struct])
        self.words = self.record.view(np.uint64)  # every struct is a whole number of 8-byte words
        # cuLaunchKernel's kernelParams: the address of each argument; there is one, the block.
        self.address = np.array([self.record.ctypes.data], np.uint64)
        # (word index of a pointer field, array name)
        self.array_slots = [(_pointer_offset(struct, field) // 8, name) for field, name in arrays]

    def set(self, **values: Any) -> None:
        """Scalar fields by name; the record's dtype gives each its C++ width."""
        for name, value in values.items():
            self.record[name] = value

    def write_pointers(self, arrays: Mapping[str, Any]) -> None:
        words = self.words
        for index, name in self.array_slots:
            words[index] = arrays[name].data.ptr


class TensorMapParams:
    """A ParamBlock and a second kernel parameter after it: the tensor maps (tma.py) of some of
    the arrays the block points at, 128 bytes each, 64-byte aligned, in the kernel's order. A
    map embeds its array's address, so write_pointers puts in, for each array, the map of its
    current address: encoded by the driver (microseconds) the first time, then taken from a
    few remembered per array (a loop whose memory pool hands out the same blocks pays once)."""

    REMEMBERED = 8  # addresses per array whose descriptors are kept

    __slots__ = ("block", "maps", "storage", "descriptors", "address", "_current", "_known", "_encode")

    def __init__(self, block: ParamBlock, maps: Sequence[tuple[str, Any]]) -> None:
        from . import tma  # ctypes and the driver, only for the kernels that read maps

        self.block, self.maps = block, tuple(maps)
        self._encode, size = tma.encode, tma.DESCRIPTOR_BYTES * len(self.maps)
        self.storage = np.zeros(size + 64, np.uint8)
        start = -self.storage.ctypes.data % 64
        self.descriptors = self.storage[start:start + size].reshape(len(self.maps), tma.DESCRIPTOR_BYTES)
        self.address = np.array([block.record.ctypes.data, self.descriptors.ctypes.data], np.uint64)
        self._current: list[int | None] = [None] * len(self.maps)  # the address each map now holds
        self._known: list[dict[int, np.ndarray]] = [{} for _ in self.maps]  # address -> its descriptor

    def write_pointers(self, arrays: Mapping[str, Any]) -> None:
        self.block.write_pointers(arrays)
        for index, (name, tmap) in enumerate(self.maps):
            pointer = arrays[name].data.ptr
            if pointer == self._current[index]:
                continue
            known = self._known[index]
            descriptor = known.get(pointer)
            if descriptor is None:
                if len(known) >= self.REMEMBERED:
                    known.clear()
                descriptor = known[pointer] = np.frombuffer(self._encode(tmap, pointer), np.uint8)
            self.descriptors[index] = descriptor
            self._current[index] = pointer


def _pointer_offset(struct: str, field: str) -> int:
    """Byte offset of a pointer field: a Tensor16's ptr, or a dotted path into a nested struct."""
    outer, _, inner = field.partition(".")
    offset, kind = DTYPES[struct].fields[outer][1], dict(STRUCTS[struct])[outer]
    if inner:
        return offset + _pointer_offset(kind, inner)
    return offset + (_PTR_OFFSET if kind == "Tensor16" else 0)


# The packed-batch arrays a varlen call passes by pointer (sequence.cuh), in NextFeatures.
VARLEN_ARRAYS = ("cu_seqlens_q", "cu_seqlens_k", "seqused_k")


def _varlen(p: Problem, t: Mapping[str, Any], values: dict[str, Any]) -> list[tuple[str, str]]:
    """For a packed batch: NextFeatures' totals into values, and the pointer fields of the
    offset arrays in t (seqused_k only when given; null means "up to the next sequence")."""
    if not p.varlen:
        return []
    features = dict(_FIELD_ZEROS["NextFeatures"])
    features.update(total_q=p.total_q, total_k=p.total_k)
    values["next"] = tuple(features.values())
    return [(f"next.{name}", name) for name in VARLEN_ARRAYS if t.get(name) is not None]


def _sizes(p: Problem) -> dict[str, Any]:
    return {"batch": p.batch, "seqlen_q": p.seqlen_q, "seqlen_k": p.seqlen_k, "heads_q": p.heads_q,
            "group_size": p.group_size, "head_dim": p.stored_head_dim, "window_left": p.window[0],
            "window_right": p.window[1], "scale_log2": np.float32(p.softmax_scale * LOG2_E)}


def _tensors(p: Problem, t: Mapping[str, Any], names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """(0, batch, row, head strides) per tensor; a packed batch's batch stride is 0: its
    sequence b starts at row cu_seqlens[b] of the one packed array instead (sequence.cuh)."""
    tensors = {name: (0, *_element_strides(t[name])) for name in names}
    return {name: (0, 0, *s[2:]) for name, s in tensors.items()} if p.varlen else tensors


FORWARD_TENSORS = ("q", "k", "v", "out")
BACKWARD_TENSORS = ("q", "k", "v", "out", "dout", "dq", "dk", "dv")


def forward_params(p: Problem, t: Mapping[str, Any]) -> ParamBlock:
    """The FwdParams of a forward call on the arrays in t (q, k, v, out, lse)."""
    arrays = [(name, name) for name in (*FORWARD_TENSORS, "lse")]
    values = {**_tensors(p, t, FORWARD_TENSORS), **_sizes(p)}
    arrays += _varlen(p, t, values)
    return ParamBlock("FwdParams", values, arrays)


def backward_params(p: Problem, t: Mapping[str, Any]) -> ParamBlock:
    """The BwdParams of a backward call on the arrays in t. dq_accum is optional (null without
    atomic dQ); shaped like q it is the mma.sync layout and its strides are filled, otherwise
    it is the Hopper kernel's DqUnits layout, which has none."""
    values = {**_tensors(p, t, BACKWARD_TENSORS), **_sizes(p), "dq_accum_head_dim": p.kernel_head_dim,
              "softmax_scale": np.float32(p.softmax_scale)}
    arrays = [(name, name) for name in (*BACKWARD_TENSORS, "lse", "delta", "lse_log2")]
    arrays += _varlen(p, t, values)
    accum = t.get("dq_accum")
    if accum is not None:
        arrays.append(("dq_accum", "dq_accum"))
        if accum.ndim == 4:
            strides = _element_strides(accum)
            values.update(dq_accum_batch_stride=0 if p.varlen else strides[0], dq_accum_row_stride=strides[1],
                          dq_accum_head_stride=strides[2])
    return ParamBlock("BwdParams", values, arrays)


class Launch:
    """One kernel launch: the loaded kernel, its grid, block and shared memory, and the
    parameter block it reads (shared by every launch of a plan)."""

    __slots__ = ("function", "grid", "block", "smem", "params", "_head", "_kernel_params", "_launch_kernel")

    def __init__(self, function: Any, grid: tuple[int, int, int], threads: int, smem: int,
                 params: ParamBlock) -> None:
        self.function = function  # a cupy Function; holding it keeps its module loaded
        self.grid, self.block, self.smem, self.params = grid, (threads, 1, 1), smem, params
        # cuLaunchKernel's arguments before the stream, looked up once
        self._head = (function.ptr, *grid, threads, 1, 1, smem)
        self._kernel_params = params.address.ctypes.data  # the void** (params keeps it alive)
        self._launch_kernel = require_cupy().cuda.driver.launchKernel

    def run(self, stream_ptr: int) -> None:
        """Queue the kernel with its block as it is now (the caller wrote the pointers)."""
        self._launch_kernel(*self._head, stream_ptr, self._kernel_params, 0)
