"""Where the caller's arrays live, and bringing them to the GPU.

Accepted: CuPy arrays; NumPy arrays (copied to the current GPU, results returned as NumPy);
any object with __cuda_array_interface__ or a CUDA __dlpack__ (PyTorch, JAX, ...), wrapped
zero-copy as CuPy arrays; CPU DLPack objects are treated like NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .device import cupy_module, require_cupy

_DLPACK_CPU = 1  # kDLCPU in the DLPack device enum


@dataclass(frozen=True)
class Placement:
    """Host (NumPy in, NumPy out) or a GPU id."""

    on_host: bool
    device_id: int | None = None

    def describe(self) -> str:
        return "a NumPy (host) array" if self.on_host else f"on GPU {self.device_id}"


def _wrap(name: str, obj: Any) -> tuple[Any, Placement]:
    """The object as a NumPy or CuPy array, without copying, and where it lives."""
    if isinstance(obj, np.ndarray):
        return obj, Placement(True)
    cupy = cupy_module()
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return obj, Placement(False, obj.device.id)
    if hasattr(obj, "__dlpack_device__") and obj.__dlpack_device__()[0] == _DLPACK_CPU:
        return np.from_dlpack(obj), Placement(True)
    if hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__"):
        cupy = require_cupy()
        array = cupy.from_dlpack(obj) if hasattr(obj, "__dlpack__") else cupy.asarray(obj)
        return array, Placement(False, array.device.id)
    raise TypeError(f"{name} must be a CuPy or NumPy array, or an object with __dlpack__ or "
                    f"__cuda_array_interface__; got {type(obj).__name__}")


def wrap_all(**named: Any) -> tuple[dict[str, Any], Placement]:
    """Wrap every non-None argument; all must live in one place (host, or one GPU)."""
    arrays: dict[str, Any] = {}
    first: tuple[str, Placement] | None = None
    for name, obj in named.items():
        if obj is None:
            continue
        arrays[name], placement = _wrap(name, obj)
        if first is None:
            first = (name, placement)
        elif placement != first[1]:
            raise ValueError(f"{name} is {placement.describe()} but {first[0]} is {first[1].describe()}; "
                             "pass every array on the same device (all NumPy, or all on one GPU)")
    assert first is not None, "wrap_all needs at least one array"  # internal: callers pass q
    return arrays, first[1]


def to_gpu(array: Any) -> Any:
    """A CuPy array on the current device (a copy for NumPy input, the array itself otherwise)."""
    cupy = require_cupy()
    return cupy.asarray(array)


def to_caller(array: Any, placement: Placement) -> Any:
    """Results go back the way the inputs came: NumPy for host inputs, CuPy otherwise."""
    return array.get() if placement.on_host else array
