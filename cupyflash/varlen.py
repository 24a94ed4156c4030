"""Packed variable-length batches: the checks on their arrays and offsets, and the Problem the
kernels run them as.

Layout (flash_attn's): q (total_q, heads_q, head_dim), k and v (total_k, heads_kv, head_dim);
cu_seqlens_q and cu_seqlens_k int32 (batch + 1,), sequence b owning query rows
[cu_seqlens_q[b], cu_seqlens_q[b + 1]) and key rows from cu_seqlens_k[b] on, seqused_k[b] of
them when seqused_k (int32 (batch,)) is given, else up to cu_seqlens_k[b + 1]. max_seqlen_q and
max_seqlen_k are Python ints at least every sequence's length: they size the kernels' grids, so
no offset is read back to the host and a call can be captured in a CUDA graph.

What is checked without a device sync: every array's kind, dtype, rank, shape and contiguity,
batch + 1 offsets in both, the max_seqlen types and ranges. What is not: the offsets' values
(starting at 0, non-decreasing, cu_seqlens_q[-1] == total_q, cu_seqlens_k[-1] <= total_k, each
length at most its max_seqlen, 0 <= seqused_k[b] <= its slot). check=True copies them to the
host and checks those too. Without it, offsets that break the rules give wrong results but no
access outside the arrays: the kernels clamp every offset into [0, total] (sequence.cuh).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping

import numpy as np

from .problem import (MAX_GRID_YZ, MAX_SEQLEN, Problem, _check_dtype, _check_last_dim_contiguous, _kernel_window,
                      dtype_name)

OFFSET_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "seqused_k")


def _check_3d(name: str, array: Any, what: str) -> None:
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D ({what}, heads, head_dim) for a packed batch; got shape "
                         f"{tuple(array.shape)} (attention() takes 4-D (batch, seqlen, heads, head_dim))")


def _check_offsets(name: str, array: Any, length: int | None) -> int:
    """An int32, 1-D, contiguous array; its length (which must be `length` when given)."""
    if dtype_name(array) != "int32":
        raise TypeError(f"{name}.dtype is {dtype_name(array)}; it must be int32 (flash_attn's convention)")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(array.shape)}")
    if array.shape[0] > 1 and array.strides[0] != array.itemsize:
        raise ValueError(f"{name} must be contiguous; its stride is {array.strides[0] // array.itemsize} "
                         f"elements (pass {name}.copy())")
    if length is not None and array.shape[0] != length:
        rule = "batch + 1, like cu_seqlens_q" if name == "cu_seqlens_k" else "batch = len(cu_seqlens_q) - 1"
        raise ValueError(f"{name} has {array.shape[0]} entries; it must have {length} ({rule})")
    return int(array.shape[0])


def _check_max_seqlen(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (the longest sequence's length, known on the host so "
                        f"that nothing is read back from the GPU); got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if not 0 <= value <= MAX_SEQLEN:
        raise ValueError(f"{name} is {value}; it must be in [0, {MAX_SEQLEN}]")
    return value


def problem_of(q: Any, k: Any, v: Any, offsets: Mapping[str, Any], max_seqlen_q: Any, max_seqlen_k: Any, *,
               causal: bool, softmax_scale: Any, window_size: Any, softcap: Any = 0.0, alibi_slopes: Any = None,
               dropout_p: Any = 0.0, sources: Mapping[str, Any] | None = None) -> Problem:
    """The checked Problem of a packed batch. offsets: cu_seqlens_q, cu_seqlens_k and optionally
    seqused_k (None or absent: not given). Values of the offsets are not read (check_values does)."""
    sources = sources or {}
    _check_3d("q", q, "total_q")
    for name, array in (("k", k), ("v", v)):
        _check_3d(name, array, "total_k")
    _check_dtype("q", q, source=sources.get("q"))
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k.shape {tuple(k.shape)} and v.shape {tuple(v.shape)} differ; k and v must have "
                         "the same (total_k, heads_kv, head_dim)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k.shape[2] (head_dim) is {k.shape[2]} but q.shape[2] is {q.shape[2]}; "
                         "q, k and v must share head_dim")
    total_q, heads_q, total_k = int(q.shape[0]), int(q.shape[1]), int(k.shape[0])
    for where, size in (("q.shape[0] (total_q)", total_q), ("k.shape[0] (total_k)", total_k)):
        if size > MAX_SEQLEN:
            raise ValueError(f"{where} is {size}; a packed batch holds at most {MAX_SEQLEN} rows "
                             "(2**30 - 1024: the kernels hold row positions in 32-bit ints)")
    if heads_q > MAX_GRID_YZ:
        raise ValueError(f"q.shape[1] (heads_q) is {heads_q}; heads_q must be at most {MAX_GRID_YZ} "
                         "(a CUDA grid dimension)")
    entries = _check_offsets("cu_seqlens_q", offsets["cu_seqlens_q"], None)
    if entries < 1:
        raise ValueError("cu_seqlens_q is empty; it must have batch + 1 entries, the first 0")
    _check_offsets("cu_seqlens_k", offsets["cu_seqlens_k"], entries)
    batch = entries - 1
    if batch > MAX_GRID_YZ:
        raise ValueError(f"cu_seqlens_q holds {batch} sequences; a packed batch has at most {MAX_GRID_YZ} "
                         "(a CUDA grid dimension)")
    if offsets.get("seqused_k") is not None:
        _check_offsets("seqused_k", offsets["seqused_k"], batch)
    max_q, max_k = _check_max_seqlen("max_seqlen_q", max_seqlen_q), _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    # The dense checks on 4-D views of one "sequence" of all rows: dtypes, heads, head_dim,
    # contiguity and the options; then the packed batch's sizes replace the view's.
    dense = Problem.from_arrays(q[None], k[None], v[None], causal=causal, softmax_scale=softmax_scale,
                                window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                dropout_p=dropout_p, sources=sources)
    # No sequence is longer than the rows there are: the grid need not be either.
    seqlen_q, seqlen_k = min(max_q, total_q), min(max_k, total_k)
    return dataclasses.replace(dense, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               window=_kernel_window(*dense.window, seqlen_q, seqlen_k), varlen=True,
                               total_q=total_q, total_k=total_k)


def check_backward(problem: Problem, dout: Any, out: Any, lse: Any, sources: Mapping[str, Any] | None = None) -> None:
    """dout and out like q (total_q, heads_q, head_dim); lse float32 (heads_q, total_q)."""
    q_shape = (problem.total_q, problem.heads_q, problem.head_dim)
    for name, array in (("dout", dout), ("out", out)):
        _check_3d(name, array, "total_q")
        if tuple(array.shape) != q_shape:
            raise ValueError(f"{name}.shape is {tuple(array.shape)}; it must equal q.shape {q_shape}")
        _check_dtype(name, array, problem.dtype, (sources or {}).get(name))
        _check_last_dim_contiguous(name, array)
    if tuple(lse.shape) != problem.stats_shape:
        raise ValueError(f"lse.shape is {tuple(lse.shape)}; it must be (heads_q, total_q) = {problem.stats_shape}, "
                         "as returned by attention_varlen(..., return_lse=True)")
    if dtype_name(lse) != "float32":
        raise TypeError(f"lse.dtype is {dtype_name(lse)}; it must be float32, as returned by attention_varlen()")


def check_values(problem: Problem, offsets: Mapping[str, Any], max_seqlen_q: int, max_seqlen_k: int) -> None:
    """check=True: the offsets' values, copied to the host (a device sync). ValueError names the
    array, the entry and the rule."""
    cu_q, cu_k = (np.asarray(_host(offsets[name]), dtype=np.int64) for name in ("cu_seqlens_q", "cu_seqlens_k"))
    for name, cu, total, last_rule in (("cu_seqlens_q", cu_q, problem.total_q, "=="),
                                       ("cu_seqlens_k", cu_k, problem.total_k, "<=")):
        if cu[0] != 0:
            raise ValueError(f"{name}[0] is {cu[0]}; it must be 0")
        steps = np.flatnonzero(np.diff(cu) < 0)
        if steps.size:
            b = int(steps[0])
            raise ValueError(f"{name} decreases at entry {b + 1} ({cu[b]} then {cu[b + 1]}); it must be non-decreasing")
        if (cu[-1] != total) if last_rule == "==" else (cu[-1] > total):
            raise ValueError(f"{name}[-1] is {cu[-1]}; it must be {last_rule} {total}, the rows of "
                             f"{'q' if name == 'cu_seqlens_q' else 'k'}")
    lengths_q, lengths_k = np.diff(cu_q), np.diff(cu_k)
    if offsets.get("seqused_k") is not None:
        used = np.asarray(_host(offsets["seqused_k"]), dtype=np.int64)
        bad = np.flatnonzero((used < 0) | (used > lengths_k))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"seqused_k[{b}] is {used[b]}; it must be in [0, {lengths_k[b]}], the keys sequence {b} "
                             "holds (cu_seqlens_k[b + 1] - cu_seqlens_k[b])")
        lengths_k = used
    for name, lengths, limit in (("max_seqlen_q", lengths_q, max_seqlen_q), ("max_seqlen_k", lengths_k, max_seqlen_k)):
        if lengths.size and lengths.max() > limit:
            b = int(np.argmax(lengths))
            raise ValueError(f"{name} is {limit} but sequence {b} has {lengths[b]} "
                             f"{'queries' if name == 'max_seqlen_q' else 'keys'}; it must be at least every length")


def _host(array: Any) -> Any:
    get = getattr(array, "get", None)  # a CuPy array
    return get() if callable(get) else array
