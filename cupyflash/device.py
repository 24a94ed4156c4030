"""What GPU (if any) this process can use, and its limits. CuPy is optional: the references,
the input checks and the CLI's CPU paths work without it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

# cp.async, ldmatrix and bfloat16 mma.sync: the kernels need Ampere (sm_80) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)

INSTALL_HINT = (
    "install CuPy and NVRTC for your CUDA driver: pip install 'cupyflash[cuda12]' "
    "(CUDA 12 drivers) or 'cupyflash[cuda13]' (CUDA 13 drivers)"
)


def cupy_module() -> ModuleType | None:
    """CuPy, or None when it is not installed."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def require_cupy() -> ModuleType:
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError(f"cupyflash needs CuPy to run on the GPU; {INSTALL_HINT}")
    return cupy


def gpu_count() -> int:
    """Number of visible CUDA GPUs; 0 without CuPy, a driver or a device."""
    cupy = cupy_module()
    if cupy is None:
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or a driver without devices: both mean "no GPU"
        return 0


@dataclass(frozen=True)
class DeviceLimits:
    """The numbers config feasibility depends on (fakeable in tests)."""

    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    smem_per_block_optin: int  # bytes of dynamic shared memory one block may opt in to
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def device_limits(device_id: int) -> DeviceLimits:
    cupy = require_cupy()
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return DeviceLimits(
        name=name.decode() if isinstance(name, bytes) else str(name),
        compute_capability=(int(props["major"]), int(props["minor"])),
        sm_count=int(props["multiProcessorCount"]),
        smem_per_block_optin=int(props["sharedMemPerBlockOptin"]),
        smem_per_sm=int(props["sharedMemPerMultiprocessor"]),
        regs_per_sm=int(props["regsPerMultiprocessor"]),
    )


def require_supported_gpu(device_id: int) -> DeviceLimits:
    """The GPU's limits, or one RuntimeError line naming it when its compute capability is older
    than the kernels need (a T4 or V100 would otherwise meet a long NVRTC log on its first call)."""
    limits = device_limits(device_id)
    if tuple(limits.compute_capability) < MIN_COMPUTE_CAPABILITY:
        have = ".".join(map(str, limits.compute_capability))
        need = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise RuntimeError(f"GPU {device_id} ({limits.name}) has compute capability {have}; cupyflash needs {need} "
                           "or newer (Ampere, Ada, Hopper); cupyflash.reference computes attention on the CPU")
    return limits


def current_device_id() -> int:
    return require_cupy().cuda.runtime.getDevice()
