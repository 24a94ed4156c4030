"""merge_attention's checks and its one kernel launch (kernels_cu/flash_merge.cu).

Results of attention for the same queries over disjoint sets of keys combine exactly by their
lse: with m = max_i lse_i and w_i = exp(lse_i - m), the union's lse is m + log(sum w_i) and its
out is sum_i w_i out_i / sum_i w_i. The kernel does it in float32 for any number of parts, reading
each part where it lies (a small device table holds their addresses).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import launch
from .arrays import Placement, check_given, to_gpu, wrap_all
from .build import load_function
from .device import device_limits, require_cupy
from .kernels import flash_merge
from .problem import _check_dtype, _check_last_dim_contiguous, dtype_name


def checked_inputs(outs: Any, lses: Any) -> tuple[list[Any], list[Any], Placement]:
    """The parts as NumPy or CuPy arrays, all in one place (host, or one GPU), and that place;
    every check is made here, on the host, before any GPU work."""
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of arrays, one per part; got {type(parts).__name__}")
    if len(outs) != len(lses):
        raise ValueError(f"outs has {len(outs)} parts but lses has {len(lses)}; give one lse per out")
    if not outs:
        raise ValueError("outs and lses are empty; merge_attention needs at least one part")
    names = [f"outs[{i}]" for i in range(len(outs))] + [f"lses[{i}]" for i in range(len(lses))]
    given = dict(zip(names, (*outs, *lses)))
    check_given("merge_attention", **given)
    arrays, placement = wrap_all(**given)
    outs, lses = [arrays[n] for n in names[:len(outs)]], [arrays[n] for n in names[len(outs):]]
    _check_shapes(outs, lses, given["outs[0]"])
    return outs, lses, placement


def _check_shapes(outs: Sequence[Any], lses: Sequence[Any], source: Any) -> None:
    """Every out (batch, seqlen_q, heads_q, head_dim) of one shape and one 16-bit dtype, head_dim
    contiguous; every lse float32 (batch, heads_q, seqlen_q). source: the caller's outs[0], for
    the cast hint."""
    first = outs[0]
    if first.ndim != 4:
        raise ValueError(f"outs[0] must be 4-D (batch, seqlen_q, heads_q, head_dim); got shape {tuple(first.shape)}")
    batch, seqlen_q, heads_q, _ = first.shape
    dtype = dtype_name(first)
    for i, out in enumerate(outs):
        name = f"outs[{i}]"
        if tuple(out.shape) != tuple(first.shape):
            raise ValueError(f"{name} has shape {tuple(out.shape)} but outs[0] has {tuple(first.shape)}; "
                             "every part must be a result for the same queries")
        if i == 0:
            _check_dtype(name, out, None, source)
        elif dtype_name(out) != dtype:
            raise TypeError(f"{name}.dtype is {dtype_name(out)} but outs[0].dtype is {dtype}; "
                            "the parts must share a dtype")
        _check_last_dim_contiguous(name, out)
    want = (batch, heads_q, seqlen_q)
    for i, lse in enumerate(lses):
        if dtype_name(lse) != "float32":
            raise TypeError(f"lses[{i}].dtype is {dtype_name(lse)}; an lse is float32, as attention(..., "
                            "return_lse=True) returns it")
        if tuple(lse.shape) != want:
            raise ValueError(f"lses[{i}] has shape {tuple(lse.shape)}; it must be (batch, heads_q, seqlen_q) = "
                             f"{want}, from outs' shape {tuple(first.shape)}")


def launch_merge(outs: Sequence[Any], lses: Sequence[Any], device_id: int) -> tuple[Any, Any]:
    """out (C-contiguous, the parts' dtype) and lse float32 (batch, heads_q, seqlen_q), queued on
    the current stream. Parts whose strides differ from the first's are copied contiguous, and
    then the first too: the kernel reads every part with one set of strides."""
    cupy = require_cupy()
    outs = [to_gpu(out) for out in outs]
    lses = [cupy.ascontiguousarray(to_gpu(lse)) for lse in lses]
    if any(out.strides != outs[0].strides for out in outs):
        outs = [cupy.ascontiguousarray(out) for out in outs]
    batch, seqlen_q, heads_q, head_dim = outs[0].shape
    out = cupy.empty(outs[0].shape, outs[0].dtype)
    lse = cupy.empty((batch, heads_q, seqlen_q), np.float32)
    grid = flash_merge.grid(batch, seqlen_q, heads_q)
    if 0 in grid:
        return out, lse
    addresses = np.array([(part.data.ptr, stats.data.ptr) for part, stats in zip(outs, lses)], np.uint64)
    table = cupy.asarray(addresses)  # stream-ordered: freed to the pool, reused only after the kernel
    item = outs[0].itemsize
    values = {"in_batch_stride": outs[0].strides[0] // item, "in_row_stride": outs[0].strides[1] // item,
              "in_head_stride": outs[0].strides[2] // item,
              "out": (0, *(s // item for s in out.strides[:3])), "num_parts": len(outs), "batch": batch,
              "seqlen_q": seqlen_q, "heads_q": heads_q, "head_dim": head_dim}
    params = launch.ParamBlock("MergeParams", values, (("part_table", "table"), ("out", "out"), ("lse", "lse")))
    spec = flash_merge.spec(dtype_name(outs[0]))
    kernel = launch.Launch(load_function(spec, device_id, device_limits(device_id).arch, 0), grid,
                           flash_merge.THREADS, 0, params)
    params.write_pointers({"table": table, "out": out, "lse": lse})
    kernel.run(cupy.cuda.get_current_stream().ptr)
    return out, lse
