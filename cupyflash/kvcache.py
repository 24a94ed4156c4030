"""attention_with_kvcache: a few new query tokens per sequence against a cache of keys and values
(decoding), with the new keys appended to the cache in place first.

One call is up to three launches of kernels_cu/flash_decode.cu over one DecodeParams block:
flash_decode_append (when k, v are given), flash_decode (num_splits key ranges per (batch, kv
head)), flash_decode_combine (when num_splits > 1 and the splits are not merged inside a
thread-block cluster: flash_decode.cluster_size). Every check here reads only shapes, strides,
dtypes and host values: the values of cache_seqlens, block_table and cache_batch_idx live on the
device, and the kernels clamp them into the arrays (wrong values give wrong results, never an
access outside); check=True copies them to the host and checks them first.

A repeat call with the same array layouts and options runs its cached plan (plan.py), which
only allocates the outputs, writes the pointers and launches.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from . import launch, tuning
from . import plan as plans
from .api import _device_of  # the one place that picks and checks the GPU
from .arrays import POINTER_ALIGN, check_given, kernel_ready, wrap_all
from .device import device_limits, require_cupy
from .kernels import flash_decode
from .kernels.common import Variant
from .problem import (INT32_MAX, LOG2_E, MAX_GRID_YZ, _check_dtype, _check_last_dim_contiguous, _check_softmax_scale,
                      _check_window, _kernel_window, check_flag, dtype_name)

MAX_HEAD_DIM = 256
CACHE_ARRAYS = ("k_cache", "v_cache")
INDEX_ARRAYS = ("cache_seqlens", "block_table", "cache_batch_idx")
MAX_NUM_SPLITS = launch.DECODE_MAX_SPLITS  # flash_decode_combine merges at most this many


@dataclass(frozen=True)
class DecodeProblem:
    """Sizes and options of one call, as the host knows them."""

    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    seqlen_new: int
    capacity: int  # keys one sequence's cache holds
    paged: bool
    page_size: int  # paged: keys per page; contiguous: the cache length
    num_pages: int  # paged: pages; contiguous: 0
    batch_cache: int  # contiguous: cache slots; paged: 0
    cache_seqlen: int | None  # the host int cache_seqlens, or None (a device array)
    softmax_scale: float
    window: tuple[int, int]  # the kernels': causal folded in (right = 0), too-wide sides -1
    num_splits: int  # as asked: 0 = choose
    split_size: int | None

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def packed_rows(self) -> int:
        """Rows of one block's tiles: the query tokens times the q heads of one kv head."""
        return self.seqlen_q * self.group_size

    @property
    def seqlen_k(self) -> int:
        """The most keys a sequence attends (plan.keep reads it)."""
        return self.capacity if self.cache_seqlen is None else self.cache_seqlen + self.seqlen_new

    @property
    def variant(self) -> Variant:
        return Variant(self.window[0] >= 0, self.window[1] >= 0, False)


def _int(name: str, value: Any, low: int, high: int, rule: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int ({rule}); got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} is {value}; it must be {rule}")
    return int(value)


def _address(array: Any) -> int:
    """The data pointer of a CuPy or NumPy array (the checks run on either, before any GPU work)."""
    # (a NumPy array's .data is a buffer, which NumPy cannot make for ml_dtypes' bfloat16)
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def _check_index_array(name: str, array: Any, shape: tuple[int, ...], what: str) -> None:
    """An int32 device array of this shape whose rows the kernels read as they are (the caller may
    change its values in place between calls or graph replays, so it is never copied)."""
    if dtype_name(array) != "int32":
        raise TypeError(f"{name}.dtype is {dtype_name(array)}; {name} must be int32 ({what})")
    if tuple(array.shape) != shape:
        raise ValueError(f"{name}.shape is {tuple(array.shape)}; it must be {shape} ({what})")
    if array.size > 1 and array.strides[-1] != 4:
        raise ValueError(f"{name}'s last dimension must be contiguous (it is read in place, never copied); "
                         f"pass {name}.copy()")
    if _address(array) % 4:
        raise ValueError(f"{name} must be 4-byte aligned")


def _check_cache(k_cache: Any, v_cache: Any, q: Any, source: Any) -> None:
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.ndim != 4:
            raise ValueError(f"{name} must be 4-D: (batch_cache, seqlen_cache, heads_kv, head_dim), or (num_pages, "
                             f"page_size, heads_kv, head_dim) with block_table; got shape {tuple(cache.shape)}")
        _check_dtype(name, cache, dtype_name(q), source)
        _check_last_dim_contiguous(name, cache)
    if tuple(k_cache.shape) != tuple(v_cache.shape) or tuple(k_cache.strides) != tuple(v_cache.strides):
        raise ValueError(f"k_cache (shape {tuple(k_cache.shape)}, strides {tuple(k_cache.strides)}) and v_cache "
                         f"(shape {tuple(v_cache.shape)}, strides {tuple(v_cache.strides)}) must have the same "
                         "shape and strides: the kernels find a key's value where they find the key")
    head_dim = k_cache.shape[3]
    if head_dim != q.shape[3]:
        raise ValueError(f"k_cache's head_dim is {head_dim} but q's is {q.shape[3]}; they must be equal")
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim is {head_dim}; with a KV cache it must be a multiple of 8 from 8 to "
                         f"{MAX_HEAD_DIM} (the cache is used in place, so it cannot be padded)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        elements = [s // cache.itemsize for s, n in zip(cache.strides[:3], cache.shape[:3]) if n > 1]
        if _address(cache) % POINTER_ALIGN or any(s % 8 for s in elements):
            raise ValueError(f"{name} must be 16-byte aligned with strides of whole 8-element chunks (its rows are "
                             "copied 16 bytes at a time, in place); a C-contiguous cache from cupy.empty is")


def problem_of(arrays: Mapping[str, Any], cache_seqlens: Any, *, causal: bool, softmax_scale: Any, window_size: Any,
               num_splits: Any, split_size: Any, sources: Mapping[str, Any]) -> DecodeProblem:
    """The checked problem; every check is on the host and needs no device sync."""
    q, k_cache, v_cache = arrays["q"], arrays["k_cache"], arrays["v_cache"]
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen_q, heads_q, head_dim); got shape {tuple(q.shape)}")
    _check_dtype("q", q, None, sources.get("q"))
    _check_last_dim_contiguous("q", q)
    _check_cache(k_cache, v_cache, q, sources.get("k_cache"))
    batch, seqlen_q, heads_q, head_dim = (int(n) for n in q.shape)
    heads_kv = int(k_cache.shape[2])
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q has {heads_q} heads and the cache {heads_kv}; heads_q must be a positive multiple of "
                         "heads_kv (MQA/GQA: q head h reads kv head h // (heads_q // heads_kv))")
    if batch > MAX_GRID_YZ or heads_kv > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and heads_kv ({heads_kv}) must each be at most {MAX_GRID_YZ} "
                         "(CUDA grid dimensions)")

    block_table, cache_batch_idx = arrays.get("block_table"), arrays.get("cache_batch_idx")
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: with a paged cache the block "
                             "table already says where each sequence's keys are")
        if block_table.ndim != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table.shape is {tuple(block_table.shape)}; it must be (batch, max_pages) with "
                             f"batch = {batch}")
        _check_index_array("block_table", block_table, tuple(block_table.shape), "page indices")
        num_pages, page_size = int(k_cache.shape[0]), int(k_cache.shape[1])
        if page_size == 0:
            raise ValueError("k_cache.shape[1] (page_size) is 0; pages hold at least one key")
        if num_pages == 0 and batch > 0:
            raise ValueError("k_cache has no pages (shape[0] is 0) but block_table points into it")
        capacity, batch_cache = int(block_table.shape[1]) * page_size, 0
    else:
        batch_cache, page_size, num_pages = int(k_cache.shape[0]), int(k_cache.shape[1]), 0
        capacity = page_size
        if cache_batch_idx is not None:
            _check_index_array("cache_batch_idx", cache_batch_idx, (batch,), "the cache slot of each sequence")
            if batch_cache == 0 and batch > 0:
                raise ValueError("k_cache has no slots (shape[0] is 0) but cache_batch_idx picks some")
        elif batch_cache != batch:
            raise ValueError(f"k_cache.shape[0] is {batch_cache} but q's batch is {batch}; without cache_batch_idx "
                             "sequence b uses cache slot b, so they must be equal")
    if capacity > INT32_MAX // 2:
        raise ValueError(f"one sequence's cache holds {capacity} keys; at most {INT32_MAX // 2} are supported")

    k_new, v_new = arrays.get("k"), arrays.get("v")
    if (k_new is None) != (v_new is None):
        raise ValueError("k and v are the new keys and values: give both or neither")
    seqlen_new = 0
    if k_new is not None:
        shape = (batch, None, heads_kv, head_dim)
        for name, new in (("k", k_new), ("v", v_new)):
            if new.ndim != 4 or (new.shape[0], new.shape[2], new.shape[3]) != (batch, heads_kv, head_dim):
                raise ValueError(f"{name}.shape is {tuple(new.shape)}; new keys and values must be (batch, "
                                 f"seqlen_new, heads_kv, head_dim) = {shape}")
            _check_dtype(name, new, dtype_name(q), sources.get(name))
            _check_last_dim_contiguous(name, new)
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k has {k_new.shape[1]} new keys but v {v_new.shape[1]} values; they must match")
        seqlen_new = int(k_new.shape[1])
        if seqlen_new > capacity:
            raise ValueError(f"k has {seqlen_new} new keys per sequence but a sequence's cache holds {capacity}")

    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        cache_seqlen = _int("cache_seqlens", cache_seqlens, 0, capacity - seqlen_new,
                            f"from 0 to the cache's {capacity} keys less the {seqlen_new} new ones")
    else:
        if cache_seqlens is None:
            raise TypeError("cache_seqlens is None; give the keys already in the cache per sequence, as an int32 "
                            "array (batch,) on the GPU or a Python int for all")
        _check_index_array("cache_seqlens", arrays["cache_seqlens"], (batch,), "keys in each sequence's cache")
        cache_seqlen = None

    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else _check_softmax_scale(softmax_scale)
    left, right = _check_window(window_size)
    if causal:
        right = 0
    window = _kernel_window(left, right, seqlen_q, capacity)
    num_splits = _int("num_splits", num_splits, 0, MAX_NUM_SPLITS,
                      f"0 (choose), 1 (no split) or a split count up to {MAX_NUM_SPLITS}")
    if split_size is not None:
        split_size = _int("split_size", split_size, 1, INT32_MAX, "a positive int")
        if split_size % flash_decode.BLOCK_N:
            raise ValueError(f"split_size is {split_size}; it must be a multiple of {flash_decode.BLOCK_N}, the "
                             "decode kernel's key tile")
        if num_splits:
            raise ValueError("num_splits and split_size both given; split_size fixes the keys per split, and so "
                             "the split count: leave num_splits at 0")
        longest = capacity if not isinstance(cache_seqlens, (int, np.integer)) else cache_seqlens + seqlen_new
        if -(-longest // split_size) > MAX_NUM_SPLITS:
            smallest = -(-longest // MAX_NUM_SPLITS // flash_decode.BLOCK_N) * flash_decode.BLOCK_N
            raise ValueError(f"split_size {split_size} cuts the {longest} keys a sequence may hold into more than "
                             f"{MAX_NUM_SPLITS} splits; use split_size >= {smallest}")
    return DecodeProblem(batch, seqlen_q, heads_q, heads_kv, head_dim, dtype_name(q), seqlen_new, capacity, paged,
                         page_size, num_pages, batch_cache, cache_seqlen, scale, window, num_splits, split_size)


def check_values(problem: DecodeProblem, arrays: Mapping[str, Any]) -> None:
    """check=True: the device values, copied to the host (a sync), against their rules."""
    limit = problem.capacity - problem.seqlen_new
    if problem.cache_seqlen is None:
        lengths = arrays["cache_seqlens"].get()
        bad = np.flatnonzero((lengths < 0) | (lengths > limit))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"cache_seqlens[{b}] is {int(lengths[b])}; each must be from 0 to {limit} (the cache's "
                             f"{problem.capacity} keys less the {problem.seqlen_new} new ones)")
    else:
        lengths = np.full(problem.batch, problem.cache_seqlen)
    if problem.paged:
        table = arrays["block_table"].get()
        for b in range(problem.batch):
            used = -(-(int(lengths[b]) + problem.seqlen_new) // problem.page_size)
            row = table[b, :used]
            bad = np.flatnonzero((row < 0) | (row >= problem.num_pages))
            if bad.size:
                raise ValueError(f"block_table[{b}, {int(bad[0])}] is {int(row[bad[0]])}; page indices must be from 0 "
                                 f"to {problem.num_pages - 1} (k_cache.shape[0] pages)")
    slots = arrays.get("cache_batch_idx")
    if slots is not None:
        slots = slots.get()
        bad = np.flatnonzero((slots < 0) | (slots >= problem.batch_cache))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"cache_batch_idx[{b}] is {int(slots[b])}; slots are 0 to {problem.batch_cache - 1}")
        if problem.seqlen_new and len(set(slots.tolist())) != len(slots):
            raise ValueError("cache_batch_idx names one cache slot for two sequences while appending k, v: "
                             "both would write the same keys")


def split_plan(problem: DecodeProblem, cfg: flash_decode.DecodeConfig, device_id: int) -> tuple[int, int]:
    """(num_splits, split_tiles): split_size fixes the tiles per split (and so the count over the
    longest possible sequence); num_splits > 0 is taken as asked; 0 chooses over the longest
    sequence the host can know of: one block per SM where that fills the GPU, else by wave
    efficiency over the resident slots."""
    key_tiles = max(1, -(-problem.seqlen_k // flash_decode.BLOCK_N))
    if problem.split_size is not None:
        split_tiles = problem.split_size // flash_decode.BLOCK_N
        return max(1, -(-key_tiles // split_tiles)), split_tiles
    if problem.num_splits:
        return problem.num_splits, 0
    limits = device_limits(device_id)
    blocks, slots = grid_fill(problem, cfg, limits)
    splits = (flash_decode.one_block_per_sm_splits(blocks, key_tiles, limits.sm_count)
              or flash_decode.choose_splits(blocks, key_tiles, slots))
    return flash_decode.prefer_cluster(splits, blocks, slots, key_tiles, limits), 0


@contextmanager
def decode_copies(bulk: bool) -> Iterator[None]:
    """Inside it, decoding takes bulk tensor copies where it can (bulk) or cp.async copies only
    (flash_decode.bulk_copies_enabled); the plans built either way are dropped on entry and exit,
    since a plan keeps the copies it was built with."""
    enabled = flash_decode.bulk_copies_enabled
    flash_decode.bulk_copies_enabled = bulk
    plans.clear()
    try:
        yield
    finally:
        flash_decode.bulk_copies_enabled = enabled
        plans.clear()


def grid_fill(problem: DecodeProblem, cfg: flash_decode.DecodeConfig, limits: Any) -> tuple[int, int]:
    """(blocks before splitting, blocks resident at once on the GPU)."""
    blocks = problem.batch * problem.heads_kv * flash_decode.m_tiles(problem.packed_rows, cfg)
    return blocks, limits.sm_count * flash_decode.blocks_per_sm(cfg, flash_decode.kernel_head_dim(problem.head_dim),
                                                                limits)


def _strides(array: Any) -> tuple[int, int, int, int]:
    return (0, *(s // array.itemsize for s in array.strides[:3]))


def build_plan(problem: DecodeProblem, t: dict[str, Any], device_id: int) -> plans.Plan:
    """The plan of one call on the kernel-ready arrays in t; allocates its outputs into t."""
    cupy = require_cupy()
    limits = device_limits(device_id)
    generation = tuning.generation()
    kernel_dim = flash_decode.kernel_head_dim(problem.head_dim)
    cfg = flash_decode.config(problem.packed_rows, problem.head_dim, limits)
    if cfg is None:
        raise RuntimeError(f"attention_with_kvcache has no decode block for head_dim {problem.head_dim} that fits "
                           f"{limits.name} ({limits.smem_per_block_optin} bytes of shared memory per block)")
    num_splits, split_tiles = split_plan(problem, cfg, device_id)
    # split_size promises a sequence the same bits in any batch, where the split count follows the
    # cache's capacity: those calls always merge in flash_decode_combine, whose sums an empty
    # split leaves bit for bit alone (a cluster's merge adds in another order).
    blocks, slots = grid_fill(problem, cfg, limits)
    cluster = 0 if split_tiles else flash_decode.cluster_size(num_splits, blocks, slots, limits)
    cfg = flash_decode.deeper_pipeline(cfg, problem.head_dim, blocks * num_splits, limits)
    maps = None  # the tensor maps of bulk tensor copies, where calls take them and the caches have maps
    if flash_decode.bulk_copies_enabled:
        bulk = flash_decode.bulk_copies(cfg, problem.head_dim, flash_decode.box_rows(problem.page_size, problem.paged),
                                        blocks * num_splits, limits)
        found = flash_decode.tensor_maps(t["k_cache"], t["v_cache"], bulk) if bulk.box_rows else None
        if isinstance(found, list):  # (a string: strides no tensor map describes; cp.async copies then)
            cfg, maps = bulk, found
    partials = num_splits > 1 and not cluster  # merged by flash_decode_combine
    q_shape = (problem.batch, problem.seqlen_q, problem.heads_q, problem.head_dim)
    stats = (problem.batch, problem.heads_q, problem.seqlen_q)
    buffers = [plans.Buffer("out", cupy.empty, q_shape, t["q"].dtype),
               plans.Buffer("lse", cupy.empty, stats, np.float32)]
    if partials:
        buffers += [plans.Buffer("out_partial", cupy.empty, (num_splits, *stats, problem.head_dim), np.float32),
                    plans.Buffer("lse_partial", cupy.empty, (num_splits, *stats), np.float32)]
    plans.allocate(buffers, t)
    values = {"q": _strides(t["q"]), "k_cache": _strides(t["k_cache"]), "v_cache": _strides(t["v_cache"]),
              "out": _strides(t["out"]), "batch": problem.batch, "seqlen_q": problem.seqlen_q,
              "heads_q": problem.heads_q, "group_size": problem.group_size, "head_dim": problem.head_dim,
              "seqlen_new": problem.seqlen_new, "cache_seqlen": problem.cache_seqlen or 0,
              "capacity": problem.capacity, "page_size": problem.page_size, "num_pages": problem.num_pages,
              "batch_cache": problem.batch_cache, "num_splits": num_splits, "split_tiles": split_tiles,
              "window_left": problem.window[0], "window_right": problem.window[1],
              "scale_log2": np.float32(problem.softmax_scale * LOG2_E)}
    arrays = [(name, name) for name in ("q", "k_cache", "v_cache", "out", "lse")]
    if problem.seqlen_new:
        values.update(k_new=_strides(t["k"]), v_new=_strides(t["v"]))
        arrays += [("k_new", "k"), ("v_new", "v")]
    if partials:
        arrays += [("out_partial", "out_partial"), ("lse_partial", "lse_partial")]
    for name in INDEX_ARRAYS:
        if t.get(name) is not None:
            arrays.append((name, name))
    if problem.paged:
        values["block_table_batch_stride"] = t["block_table"].strides[0] // 4
    params = launch.ParamBlock("DecodeParams", values, arrays)
    if maps:
        params = launch.TensorMapParams(params, maps)

    dtype = problem.dtype
    calls = []
    if problem.seqlen_new:
        calls.append(plans.KernelCall(
            flash_decode.helper_spec(dtype, flash_decode.APPEND_ENTRY),
            flash_decode.append_grid(problem.batch, problem.seqlen_new, problem.heads_kv, problem.head_dim),
            launch.APPEND_THREADS, 0))
    grid = flash_decode.grid(problem.batch, problem.heads_kv, problem.packed_rows, num_splits, cfg)
    if grid[0] > INT32_MAX:
        raise ValueError(f"heads_kv x query tiles x splits is {grid[0]} blocks; a CUDA grid takes at most {INT32_MAX} "
                         "(fewer query tokens per call, or fewer num_splits)")
    calls.append(plans.KernelCall(flash_decode.spec(dtype, kernel_dim, cfg, problem.variant, cluster), grid,
                                  flash_decode.THREADS, cfg.smem_bytes(kernel_dim)))
    if partials:
        calls.append(plans.KernelCall(flash_decode.helper_spec(dtype, flash_decode.COMBINE_ENTRY),
                                      flash_decode.combine_grid(problem.batch, problem.seqlen_q, problem.heads_q),
                                      launch.COMBINE_THREADS, 0))
    launches = plans.load_launches(calls, params, limits, device_id)
    return plans.Plan(buffers, params, launches, ("out", "lse"), limits, generation)


def attention_with_kvcache(q: Any, k_cache: Any, v_cache: Any, k: Any = None, v: Any = None, *, cache_seqlens: Any,
                           block_table: Any = None, cache_batch_idx: Any = None, causal: bool = True,
                           softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                           num_splits: int = 0, split_size: int | None = None, return_lse: bool = False,
                           check: bool = False) -> Any:
    """Attention of new query tokens against a KV cache (decoding), appending k, v to it first.

    q: (batch, seqlen_q, heads_q, head_dim), float16 or bfloat16, on the GPU. The cache, used in
    place: contiguous k_cache, v_cache (batch_cache, seqlen_cache, heads_kv, head_dim), sequence b
    in slot cache_batch_idx[b] (int32 (batch,)) or b; or paged (num_pages, page_size, heads_kv,
    head_dim) with block_table int32 (batch, max_pages): key j of sequence b is row j % page_size
    of page block_table[b, j // page_size]. Any page size from 1; 16 and up run at full speed.
    cache_seqlens: the keys already cached per sequence, int32 (batch,) on the GPU or a Python int.

    k, v (batch, seqlen_new, heads_kv, head_dim), when given, are written into the cache at keys
    cache_seqlens[b] .. + seqlen_new, in place, before attending (cache_seqlens itself is not
    changed: advance it yourself). Writing in place into arrays owned by JAX (which assumes they
    never change) is undefined; two sequences sharing a slot through cache_batch_idx race.

    Sequence b then attends over its cache_seqlens[b] + seqlen_new keys; causal (the default)
    and window_size are bottom-right aligned as in attention(): query token i sees keys up to
    cache_seqlens[b] + seqlen_new - seqlen_q + i. GQA / MQA when heads_q is a multiple of heads_kv.

    num_splits: key ranges per (sequence, kv head), each its own thread block, merged by lse
    (0 chooses by wave efficiency, 1 does not split). split_size (a multiple of 64) fixes the keys
    per range instead, so a sequence's result does not depend on the rest of the batch.

    Returns out like q, and with return_lse also lse (batch, heads_q, seqlen_q) float32 (natural
    log; -inf for a row that sees no key). No backward.

    Checked on the host, before any GPU work: every dtype, shape, stride and host value.
    Not checked (that needs a device sync): the values of cache_seqlens (0 .. capacity -
    seqlen_new), block_table (0 .. num_pages - 1) and cache_batch_idx (0 .. batch_cache - 1);
    the kernels clamp them into the arrays, so bad values give wrong results but never touch
    memory outside them. check=True copies them to the host and checks them first. Because
    nothing is read back, a call can be captured in a CUDA graph and replayed with
    cache_seqlens (and the table) changed in place on the device.
    """
    # Flags as bools first (the plan key holds them as given), checked only when they are not.
    if causal.__class__ is not bool or return_lse.__class__ is not bool or check.__class__ is not bool:
        causal, return_lse, check = (check_flag(name, value) for name, value in
                                     (("causal", causal), ("return_lse", return_lse), ("check", check)))
    is_int = isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, (bool, np.bool_))
    host_length = cache_seqlens if is_int else None
    device_seqlens = None if host_length is not None else cache_seqlens
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": device_seqlens,
             "block_table": block_table, "cache_batch_idx": cache_batch_idx}
    present = {name: x for name, x in named.items() if x is not None}  # the arrays given, by name
    inputs = tuple(present.values())
    options = ("decode", causal, softmax_scale, window_size, num_splits, split_size, host_length,
               k is None, v is None, device_seqlens is None, block_table is None, cache_batch_idx is None)
    plan = None if check else plans.find("decode", inputs, options, (0.0, None, 0.0, None))
    if plan is not None:
        out, lse = plan.run(present)
        return (out, lse) if return_lse else out
    check_given("attention_with_kvcache", q=q, k_cache=k_cache, v_cache=v_cache)
    arrays, placement = wrap_all(**present)
    problem = problem_of(arrays, cache_seqlens, causal=causal,
                         softmax_scale=softmax_scale, window_size=window_size, num_splits=num_splits,
                         split_size=split_size, sources=named)
    if placement.on_host:
        raise TypeError("attention_with_kvcache works on GPU arrays: it writes new keys into the cache in place, "
                        "so q, the cache and the index arrays must all be on one GPU (cupy.asarray copies "
                        "a NumPy array there)")
    if check:
        check_values(problem, arrays)
    cupy = require_cupy()
    with _device_of(placement) as device_id:
        t = dict(arrays)
        t["q"] = kernel_ready(arrays["q"])
        for name in ("k", "v"):
            if name in t:
                t[name] = kernel_ready(arrays[name])
        if problem.batch == 0 or problem.heads_q == 0:
            out = cupy.empty(tuple(q.shape), arrays["q"].dtype)
            lse = cupy.empty((problem.batch, problem.heads_q, problem.seqlen_q), np.float32)
            return (out, lse) if return_lse else out
        plan = build_plan(problem, t, device_id)
        out, lse = plan.launch(t)
        ready = tuple(t[name] for name in present)
        plans.keep(plan, problem, "decode", inputs, options, ready, device_id)
    return (out, lse) if return_lse else out
