"""Source -> cubin -> CuPy function.

One path for every architecture: NVRTC compiles a kernels_cu/*.cu file with -D macros for one
variant and an explicit -arch, producing a cubin (no GPU needed, so the CPU test suite compiles
every variant). Cubins are cached on disk under a key that covers the hash of all of
kernels_cu/ (CuPy's own cache ignores #included headers), the variant, the arch and the NVRTC
version; files are written atomically, so a second process loads them without calling NVRTC.
Each cubin has a .json beside it (written last) with its length and sha256: an entry that fails
them, or is not ELF, never reaches module.load (where a truncated cubin is a segfault); it is
warned about (CacheWarning), recompiled and replaced. A cache folder that cannot be written
warns once and kernels compile in memory. Loaded functions are memoized per device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, launch, settings
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
            # Every compile checks the parameter structs and shared constants against launch.py.
            f"-DCF_HOST_LAYOUT={launch.host_layout()}",
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
    """One cubin per (sources, file, macros, arch, NVRTC, launch.py's layout): the entry points of a
    file share it."""
    return (source_hash(), spec.source, repr(spec.defines), spec.target(arch), "nvrtc%d.%d" % nvrtc_version(),
            __version__, launch.host_layout())


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


class CacheWarning(RuntimeWarning):
    """The kernel disk cache held a bad entry (rebuilt) or could not be written (kernels compile
    in memory). Never an error: the cache only saves compile time."""


ELF_MAGIC = b"\x7fELF"
# The metadata beside each cubin; written last, so a readable one marks a complete pair.
_META_TYPES = {"log": str, "length": int, "sha256": str, "source": str, "defines": dict, "arch": str}


class _BadEntry(Exception):
    """A cache entry that must not reach module.load; the message says what is wrong with it."""


def _check_meta(meta: Any, meta_path: Path) -> None:
    """Raise _BadEntry unless `meta` has every field of _META_TYPES with its type. Entries from
    before the length and sha256 were stored fail here too, and are rebuilt."""
    if not isinstance(meta, dict):
        raise _BadEntry(f"{meta_path} holds {json.dumps(meta)[:40]}, not a JSON object")
    for name, kind in _META_TYPES.items():
        value = meta.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _BadEntry(f"{meta_path}: field {name!r} is {value!r}, expected a {kind.__name__}")


def _read_entry(cubin_path: Path, meta_path: Path) -> tuple[bytes, str] | None:
    """(cubin, ptxas log) of an intact cache entry; None when there is none (a plain miss);
    _BadEntry when there is one that fails the checks (truncated, bit-flipped, half written)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        if cubin_path.is_file():  # a writer died between the two files, or the copy lost one
            raise _BadEntry(f"{cubin_path} has no metadata file {meta_path.name}") from None
        return None
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _BadEntry(f"{meta_path} is unreadable ({type(error).__name__}: {error})") from None
    _check_meta(meta, meta_path)
    try:
        cubin = cubin_path.read_bytes()
    except OSError as error:
        raise _BadEntry(f"{cubin_path} is unreadable ({type(error).__name__}: {error})") from None
    # A truncated or corrupted cubin crashes the driver inside module.load (SIGSEGV, no message).
    if len(cubin) != meta["length"]:
        raise _BadEntry(f"{cubin_path} is {len(cubin)} bytes, its metadata says {meta['length']}")
    if not cubin.startswith(ELF_MAGIC):
        raise _BadEntry(f"{cubin_path} does not start with the ELF magic")
    if hashlib.sha256(cubin).hexdigest() != meta["sha256"]:
        raise _BadEntry(f"{cubin_path} does not match the sha256 in its metadata")
    return cubin, meta["log"]


_unwritable_dirs: set[Path] = set()  # warned about once per process


def _unwritable_reason(directory: Path, error: OSError) -> str:
    return (f"kernel cache {directory} is not writable ({type(error).__name__}: {error}): kernels compile in "
            f"memory; set CUPYFLASH_CACHE_DIR to a writable folder, or CUPYFLASH_NO_DISK_CACHE=1")


def _store(kernel: CompiledKernel, spec: KernelSpec, arch: str, cubin_path: Path, meta_path: Path) -> None:
    """Write the pair atomically, metadata last; an unwritable cache warns once per directory."""
    meta = {"log": kernel.log, "length": len(kernel.cubin), "sha256": hashlib.sha256(kernel.cubin).hexdigest(),
            "source": spec.source, "defines": dict(spec.defines), "arch": spec.target(arch)}
    try:
        write_atomic(cubin_path, kernel.cubin)
        write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # written last: marks the pair complete
    except OSError as error:
        if cubin_path.parent not in _unwritable_dirs:
            _unwritable_dirs.add(cubin_path.parent)
            warnings.warn(_unwritable_reason(cubin_path.parent, error), CacheWarning, stacklevel=3)


def cached_kernel(spec: KernelSpec, arch: str) -> CompiledKernel:
    """The compiled variant, from the disk cache when an intact entry is there, else compiled
    and stored. A bad entry is warned about (CacheWarning) and replaced; a cache that cannot be
    written is warned about once and the kernel is returned from memory. Never raises for the cache."""
    if not settings.disk_cache_enabled():
        return compile_kernel(spec, arch)
    base = settings.kernel_cache_dir() / cache_key(spec, arch)
    cubin_path, meta_path = base.with_suffix(".cubin"), base.with_suffix(".json")
    try:
        entry = _read_entry(cubin_path, meta_path)
    except _BadEntry as bad:
        warnings.warn(f"bad kernel cache entry, recompiling: {bad}", CacheWarning, stacklevel=2)
        entry = None
    if entry is not None:
        cubin, log = entry
        return CompiledKernel(cubin, *_ptxas_numbers(log, spec.entry), log)
    kernel = compile_kernel(spec, arch)
    _store(kernel, spec, arch, cubin_path, meta_path)
    return kernel


def disk_cache_problem() -> str | None:
    """None when compiled kernels can be cached on disk: the kernel cache folder exists (or can
    be created; this creates it, as a first compile would) and a file can be written in it.
    Otherwise one line saying why not and that kernels compile in memory. None, without touching
    the disk, when CUPYFLASH_NO_DISK_CACHE turns the cache off: that is a choice, not a problem."""
    if not settings.disk_cache_enabled():
        return None
    directory = settings.kernel_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe", suffix=".tmp") as probe:
            probe.write(b"\0")
            probe.flush()  # a full disk fails here, not at open
    except OSError as error:
        return _unwritable_reason(directory, error)
    return None


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
