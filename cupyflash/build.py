"""Source -> cubin -> CuPy function.

One path for every architecture: NVRTC compiles a kernels_cu/*.cu file with -D macros for one
variant and an explicit -arch, producing a cubin (no GPU needed, so the CPU test suite compiles
every variant). Cubins are cached on disk under a key that covers the hash of all of
kernels_cu/ (CuPy's own cache ignores #included headers), the variant, the arch and the NVRTC
version; files are written atomically, so a second process loads them without calling NVRTC.
Loaded functions are memoized per device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, settings
from .device import require_cupy


def kernel_dir() -> Path:
    """kernels_cu/: inside the installed package (wheels), else at the repository top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (candidate / "flash_fwd.cu").is_file():
            return candidate
    raise FileNotFoundError(f"kernel sources (kernels_cu/flash_fwd.cu) not found next to {here}")


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 over every kernel source file, names included (first 16 hex digits)."""
    digest = hashlib.sha256()
    for path in sorted(kernel_dir().glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant: a source file, its entry point and its -D macros."""

    source: str  # file name in kernels_cu/
    entry: str  # extern "C" function name
    defines: tuple[tuple[str, str], ...]
    # "a" for kernels with Hopper-only instructions (wgmma): compiled for sm_90a, not sm_90.
    arch_suffix: str = ""

    def target(self, arch: str) -> str:
        """The architecture NVRTC compiles for on a GPU of `arch` ("sm_90" -> "sm_90a" for wgmma)."""
        return arch + self.arch_suffix

    def options(self, arch: str) -> list[str]:
        return [
            f"-arch={self.target(arch)}",
            "-std=c++17",
            f"-I{kernel_dir()}",
            "--ptxas-options=-v",
            *(f"-D{name}={value}" for name, value in self.defines),
        ]


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    registers: int | None  # None when NVRTC served the program from its own cache without a report
    spill_bytes: int | None  # spill stores + spill loads reported by ptxas
    log: str


def nvrtc_version() -> tuple[int, int]:
    return tuple(require_cupy().cuda.nvrtc.getVersion())


def _ptxas_numbers(log: str, entry: str) -> tuple[int | None, int | None]:
    """Registers and spill bytes of `entry` from the -Xptxas=-v report, (None, None) without
    one: NVRTC 12.9+ keeps a cache of its own, across processes too, and a program it serves
    from there comes with an empty log. (local_memory_bytes() then tells spills on a GPU.)"""
    marker = f"Function properties for {entry}"
    section = log.split(marker)[-1] if marker in log else ""
    regs = re.search(r"Used (\d+) registers", section)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", section)
    if regs is None or spills is None:
        return None, None
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def _program_key(spec: KernelSpec, arch: str) -> tuple[str, ...]:
    """One cubin per (sources, file, macros, arch, NVRTC): the entry points of a file share it."""
    return (source_hash(), spec.source, repr(spec.defines), spec.target(arch), "nvrtc%d.%d" % nvrtc_version(),
            __version__)


_programs: dict[tuple[str, ...], tuple[bytes, str] | RuntimeError] = {}


def _compile_program(spec: KernelSpec, arch: str) -> tuple[bytes, str]:
    """(cubin, ptxas log) of spec's file and macros, compiled once per process. (NVRTC 13 keeps
    its own in-process cache and returns an empty log when asked for the same program again.)"""
    key = _program_key(spec, arch)
    if key in _programs:
        known = _programs[key]
        if isinstance(known, RuntimeError):  # a failed compile fails again, without NVRTC
            raise known
        return known
    nvrtc = require_cupy().cuda.nvrtc
    program = nvrtc.createProgram((kernel_dir() / spec.source).read_text(), spec.source, [], [])
    try:
        try:
            nvrtc.compileProgram(program, spec.options(arch))
        except nvrtc.NVRTCError as error:
            failure = _programs[key] = RuntimeError(f"NVRTC failed to compile {spec.source} ({spec.target(arch)}, "
                                                    f"{dict(spec.defines)}):\n{nvrtc.getProgramLog(program)}")
            raise failure from error
        result = _programs[key] = (nvrtc.getCUBIN(program), nvrtc.getProgramLog(program))
    finally:
        nvrtc.destroyProgram(program)
    return result


def compile_kernel(spec: KernelSpec, arch: str) -> CompiledKernel:
    """NVRTC compile of one variant to a cubin for `arch` (e.g. "sm_90"); needs no GPU."""
    cubin, log = _compile_program(spec, arch)
    registers, spill_bytes = _ptxas_numbers(log, spec.entry)
    return CompiledKernel(cubin, registers, spill_bytes, log)


def cache_key(spec: KernelSpec, arch: str) -> str:
    return hashlib.sha256("|".join(_program_key(spec, arch)).encode()).hexdigest()[:32]


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_kernel(spec: KernelSpec, arch: str) -> CompiledKernel:
    """The compiled variant, from the disk cache when present, else compiled and stored."""
    if not settings.disk_cache_enabled():
        return compile_kernel(spec, arch)
    base = settings.kernel_cache_dir() / cache_key(spec, arch)
    cubin_path, meta_path = base.with_suffix(".cubin"), base.with_suffix(".json")
    try:
        log = json.loads(meta_path.read_text())["log"]
        cubin = cubin_path.read_bytes()
        return CompiledKernel(cubin, *_ptxas_numbers(log, spec.entry), log)
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: compile again and overwrite
    kernel = compile_kernel(spec, arch)
    meta = {"log": kernel.log, "source": spec.source, "defines": dict(spec.defines), "arch": spec.target(arch)}
    write_atomic(cubin_path, kernel.cubin)
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # written last: marks the pair complete
    return kernel


_loaded: dict[tuple[int, KernelSpec], Any] = {}
_lock = threading.Lock()


def load_function(spec: KernelSpec, device_id: int, arch: str, smem_bytes: int) -> Any:
    """The kernel as a CuPy function on device_id, allowed `smem_bytes` of dynamic shared memory."""
    key = (device_id, spec)
    function = _loaded.get(key)
    if function is None:
        cupy = require_cupy()
        with _lock, cupy.cuda.Device(device_id):
            function = _loaded.get(key)
            if function is None:
                module = cupy.cuda.function.Module()
                module.load(cached_kernel(spec, arch).cubin)
                function = module.get_function(spec.entry)
                if smem_bytes > 48 * 1024:  # above 48 KB a block must opt in
                    driver = cupy.cuda.driver
                    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                            smem_bytes)
                _loaded[key] = function
    return function


def local_memory_bytes(function: Any) -> int:
    """Per-thread local memory of a loaded kernel (spills and stack): 0 for a healthy kernel."""
    driver = require_cupy().cuda.driver
    return driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, function.ptr)
