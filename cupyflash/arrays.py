"""Where the caller's arrays live, bringing them to the GPU, and the padding and alignment the
kernels need (kernel_ready) and its undoing on the results (unpadded).

Accepted: CuPy arrays; NumPy arrays (copied to the current GPU, results returned as NumPy);
any object with __cuda_array_interface__ or a CUDA __dlpack__ (PyTorch, JAX, ...), wrapped
zero-copy as CuPy arrays. Other CPU DLPack objects are treated like NumPy arrays, except torch
CPU tensors: results would come back as NumPy where a torch user expects tensors (and outside
autograd), so they are refused with a message saying to call .cuda().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .device import cupy_module, require_cupy
from .problem import HEAD_DIM_MULTIPLE, framework

POINTER_ALIGN = 16  # cp.async moves 16 bytes: the kernels need 16-byte aligned rows

# The DLPack device enum (dlpack.h): CPU memory, and the kinds of memory CUDA kernels can read.
_DLPACK_CPU = 1  # kDLCPU
_DLPACK_CUDA_KINDS = (2, 3, 13)  # kDLCUDA, kDLCUDAHost (pinned), kDLCUDAManaged
_DLPACK_NAMES = {4: "OpenCL", 7: "Vulkan", 8: "Metal (Apple MPS)", 9: "VPI", 10: "ROCm", 14: "oneAPI"}
ARRAY_KINDS = "a CuPy or NumPy array, or an object with __dlpack__ or __cuda_array_interface__"


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
    if hasattr(obj, "__dlpack_device__"):
        device_type = obj.__dlpack_device__()[0]
        if device_type == _DLPACK_CPU:
            return _host_dlpack(name, obj), Placement(True)
        if device_type not in _DLPACK_CUDA_KINDS:
            kind = _DLPACK_NAMES.get(device_type, f"DLPack device type {device_type}")
            raise TypeError(f"{name} is a {type(obj).__name__} in {kind} memory; cupyflash runs on CUDA GPUs: "
                            f"pass {name} on a CUDA device, or as a NumPy array")
    if hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__"):
        cupy = require_cupy()
        array = cupy.from_dlpack(obj) if hasattr(obj, "__dlpack__") else cupy.asarray(obj)
        return array, Placement(False, array.device.id)
    raise TypeError(f"{name} must be {ARRAY_KINDS}; got {type(obj).__name__}")


def _host_dlpack(name: str, obj: Any) -> np.ndarray:
    """A CPU DLPack object as a NumPy array (no copy); torch CPU tensors are refused (module docstring)."""
    if framework(obj) == "torch":
        raise TypeError(f"{name} is a torch CPU tensor; move it to the GPU with {name}.cuda() (cupyflash runs on "
                        f"CUDA arrays), or pass a NumPy array ({name}.numpy()) for NumPy results")
    return np.from_dlpack(obj)


_MADE_BY = dict.fromkeys(("out", "lse"), " (out and lse are what attention(..., return_lse=True) returns)")


def check_given(function: str, **named: Any) -> None:
    """A TypeError naming the first of the required array arguments that is None."""
    for name, obj in named.items():
        if obj is None:
            made_by = _MADE_BY.get(name, "")
            raise TypeError(f"{name} is None; {function}() needs {name} as {ARRAY_KINDS}{made_by}")


def wrap_all(**named: Any) -> tuple[dict[str, Any], Placement]:
    """Wrap every non-None argument (optional ones may be None: check_given covers the others);
    all must live in one place (host, or one GPU)."""
    arrays: dict[str, Any] = {}
    first: tuple[str, Placement] | None = None
    for name, obj in named.items():
        if obj is None:
            continue
        arrays[name], placement = _wrap(name, obj)
        if first is None:
            first = (name, placement)
        elif placement != first[1]:
            raise ValueError(_placement_mismatch(name, obj, placement, *first))
    if first is None:
        raise TypeError(f"no array given: every argument of {', '.join(named)} is None")
    return arrays, first[1]


def _placement_mismatch(name: str, obj: Any, placement: Placement, first_name: str, first: Placement) -> str:
    """What is where, and how to bring `name` to where `first_name` is."""
    where = f"{name} is {placement.describe()} but {first_name} is {first.describe()}; "
    if first.on_host:
        fix = ("pass every array as NumPy (results come back as NumPy), or every array on one GPU "
               f"(cupy.asarray({first_name}) copies a NumPy array to the current GPU)")
    elif framework(obj) == "torch":
        fix = f"pass every array on GPU {first.device_id}: {name}.to({first_name}.device) moves it there"
    else:
        fix = (f"pass every array on GPU {first.device_id}: copy {name} there with "
               f"`with cupy.cuda.Device({first.device_id}): {name} = cupy.asarray({name})`")
    return where + fix


def to_gpu(array: Any) -> Any:
    """A CuPy array on the current device (a copy for NumPy input, the array itself otherwise)."""
    cupy = require_cupy()
    return cupy.asarray(array)


def to_caller(array: Any, placement: Placement) -> Any:
    """Results go back the way the inputs came: NumPy for host inputs, CuPy otherwise."""
    return array.get() if placement.on_host else array


def kernel_ready(array: Any) -> Any:
    """The array on the GPU as the kernels read it: head_dim zero-padded to a multiple of 8
    (Problem.stored_head_dim), a 16-byte aligned pointer and strides of whole 16-byte chunks.
    An array that already is so is returned as it is (no copy)."""
    cupy = require_cupy()
    array = to_gpu(array)
    head_dim = array.shape[3]
    if head_dim % HEAD_DIM_MULTIPLE:
        padded = cupy.zeros(array.shape[:3] + (head_dim + (-head_dim) % HEAD_DIM_MULTIPLE,), array.dtype)
        padded[..., :head_dim] = array
        return padded
    aligned = array.data.ptr % POINTER_ALIGN == 0 and all(
        (stride // array.itemsize) % HEAD_DIM_MULTIPLE == 0
        for stride, n in zip(array.strides[:3], array.shape) if n > 1)
    # A copy (C-contiguous, from the pool: aligned), not ascontiguousarray, which returns an
    # already contiguous array as it is, misaligned pointer included.
    return array if aligned else array.copy()


def unpadded(array: Any, head_dim: int) -> Any:
    """The caller's head_dim columns of a result computed on kernel_ready inputs (a view)."""
    return array if array.shape[3] == head_dim else array[..., :head_dim]
