"""What this machine and this copy of cupyflash are: the facts printed beside every result.

One reader per fact, each returning it or raising with the reason it cannot be read; two views
put them together and differ only in how a missing fact is written:

    info()     `cupyflash info` (and the `cupyflash validate` header): versions, GPUs, kernel
               sources and caches; a missing fact reads "unavailable (reason)"
    record()   the environment of a benchmark report: GPU, CUDA driver / runtime / NVRTC, CuPy,
               PyTorch, kernel source hash, git commit, date; a missing fact is None
    describe(record())  that record as one line

Nothing here needs a GPU, CuPy or git: without them the facts say so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from . import __version__, build, settings, tuning
from .device import cupy_module, current_device_id, device_limits, gpu_count

GB = 1e9
VERSION_KEYS = ("cupyflash", "python", "numpy", "cupy", "cuda_runtime", "cuda_driver", "nvrtc")


# --------------------------------------------------------------------------- reading one fact


def reason(error: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def probe(read: Callable[[], Any]) -> Any:
    """read(), or "unavailable (reason)": without a GPU, a driver or CuPy some facts are missing."""
    try:
        return read()
    except Exception as error:  # a fact that cannot be read is reported, never fatal
        return f"unavailable ({reason(error)})"


def quiet(read: Callable[[], Any]) -> Any:
    """read(), or None when it raises (a missing library or device must not stop a report)."""
    try:
        return read()
    except Exception:
        return None


def cuda_version_text(number: int) -> str:
    """CUDA's integer version (12090) as text (12.9)."""
    if number == 0:  # what cudaDriverGetVersion reports when no driver is installed
        raise RuntimeError("no CUDA driver found")
    return f"{number // 1000}.{number % 1000 // 10}"


def _runtime() -> ModuleType:
    """CuPy's CUDA runtime module; a short reason when CuPy itself is missing."""
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError("CuPy not installed")
    return cupy.cuda.runtime


def cuda_runtime_version() -> str:
    return cuda_version_text(_runtime().runtimeGetVersion())


def cuda_driver_version() -> str:
    return cuda_version_text(_runtime().driverGetVersion())


def nvrtc_version() -> str:
    _runtime()  # without CuPy, say so rather than repeat the install hint
    major, minor = build.nvrtc_version()
    return f"{major}.{minor}"


def cupy_version() -> str | None:
    cupy = cupy_module()
    return cupy.__version__ if cupy is not None else None


def torch_version() -> str | None:
    """PyTorch's version, None when it does not import (it is a benchmark peer, never needed)."""
    try:
        import torch
    except Exception:  # not installed, or broken: either way there is no peer to measure
        return None
    return str(torch.__version__)


def flash_attn_4_version() -> str | None:
    """The flash-attn-4 wheel's version (an optional benchmark peer), None when not installed.
    Read from its metadata: importing it loads the CuTe DSL, seconds of work."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except Exception:
        return None


def _git(*args: str) -> str | None:
    """git's output run in this package's folder; None outside a checkout or without git."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """The checkout's commit (40 hex digits), None outside a git checkout."""
    return _git("rev-parse", "HEAD")


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def no_gpu_reason() -> str:
    """Why gpu_count() is 0, in a few words."""
    try:
        count = _runtime().getDeviceCount()
    except Exception as error:  # no CuPy, no driver: its message is the reason
        return reason(error)
    return f"the CUDA runtime sees {count} devices"


# --------------------------------------------------------------------------- `cupyflash info`


def gpu(device_id: int) -> dict[str, Any]:
    """One GPU's name, architecture and the limits the kernels' tiles depend on."""
    limits = device_limits(device_id)
    major, minor = limits.compute_capability
    return {"id": device_id, "name": limits.name, "compute_capability": f"{major}.{minor}", "arch": limits.arch,
            "sm_count": limits.sm_count, "smem_per_block_optin": limits.smem_per_block_optin,
            "smem_per_sm": limits.smem_per_sm}


def gpu_line(facts: dict[str, Any] | str) -> str:
    """gpu()'s facts in one line (or the "unavailable (...)" text as it is)."""
    if isinstance(facts, str):
        return facts
    return (f"{facts['name']}, {facts['arch']} (compute capability {facts['compute_capability']}), "
            f"{facts['sm_count']} SMs, shared memory {facts['smem_per_block_optin']} B per block (opt-in), "
            f"{facts['smem_per_sm']} B per SM")


def versions() -> dict[str, Any]:
    """VERSION_KEYS: cupyflash, Python, NumPy, CuPy ("not installed"), CUDA runtime and driver, NVRTC."""
    return {
        "cupyflash": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": cupy_version() or "not installed",
        "cuda_runtime": probe(cuda_runtime_version),
        "cuda_driver": probe(cuda_driver_version),
        "nvrtc": probe(nvrtc_version),
    }


def _tuned_file(path: Path) -> dict[str, Any]:
    """A tuning file's name and entry count; "unreadable" for a corrupt one (never raises)."""
    entries = tuning.file_entries(path)
    return {"file": path.name, "entries": "unreadable" if entries is None else len(entries)}


def caches() -> dict[str, Any]:
    """The cache folders; kernel_cache_problem is None when cubins can be cached, else why not."""
    kernels = settings.kernel_cache_dir()
    return {"kernel_cache_dir": str(kernels), "cubins": len(list(kernels.glob("*.cubin"))),
            "kernel_cache_problem": build.disk_cache_problem(),
            "tuning_dir": str(settings.tuning_dir()), "tuned": [_tuned_file(p) for p in tuning.tuning_files()]}


def info() -> dict[str, Any]:
    """Everything `cupyflash info` prints: versions(), gpus (gpu() of each, or why not), the
    kernel sources and their hash, caches()."""
    return {
        **versions(),
        "gpus": [probe(lambda i=i: gpu(i)) for i in range(gpu_count())],
        "kernel_sources": probe(lambda: str(build.kernel_dir())),
        "kernel_source_hash": probe(build.source_hash),
        **caches(),
    }


# --------------------------------------------------------------------------- benchmark reports


def _record_gpu() -> dict[str, Any]:
    """The current GPU's part of record(); every value None without a GPU."""
    keys = ("gpu", "compute_capability", "sm_count", "memory_gb", "driver_version", "runtime_version")
    if gpu_count() == 0:
        return dict.fromkeys(keys)
    limits = device_limits(current_device_id())
    return {"gpu": limits.name, "compute_capability": "%d.%d" % limits.compute_capability,
            "sm_count": limits.sm_count, "memory_gb": round(_runtime().memGetInfo()[1] / GB, 1),
            "driver_version": quiet(cuda_driver_version), "runtime_version": quiet(cuda_runtime_version)}


def _decode_copies() -> str:
    """How decoding reads the cache on Hopper in this process: "bulk" (bulk tensor copies, opt-in
    while experimental) or "cp.async"."""
    from .kernels import flash_decode

    return "bulk" if flash_decode.bulk_copies_enabled else "cp.async"


def record() -> dict[str, Any]:
    """What produced a set of numbers: GPU, CUDA driver / runtime / NVRTC, CuPy, NumPy, PyTorch
    (None when it does not import), Python, cupyflash version, kernel source hash, how decoding
    copies the cache (_decode_copies), git commit
    ("unknown" outside a checkout) and whether the checkout had local changes, date (UTC, ISO
    8601). Plain JSON values; a fact that cannot be read is None."""
    env = _record_gpu()
    env.update({
        "nvrtc_version": quiet(nvrtc_version),
        "cupy_version": cupy_version(),
        "numpy_version": np.__version__,
        "torch_version": torch_version(),
        "flash_attn_4_version": flash_attn_4_version(),
        "python_version": platform.python_version(),
        "cupyflash_version": __version__,
        "source_hash": quiet(build.source_hash),
        "decode_copies": _decode_copies(),
        "git_commit": git_commit() or "unknown",
        "git_dirty": git_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return env


def describe(env: dict[str, Any]) -> str:
    """One line naming the device, the software and the code of a record()."""
    device = env.get("gpu") or "no GPU"
    if env.get("compute_capability"):
        device += (f" (sm {env['compute_capability']}, driver {env.get('driver_version')}, "
                   f"runtime {env.get('runtime_version')}, NVRTC {env.get('nvrtc_version')})")
    commit = str(env.get("git_commit") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    fa4 = f" · flash-attn-4 {env['flash_attn_4_version']}" if env.get("flash_attn_4_version") else ""
    fa4 += " · decoding by bulk copies" if env.get("decode_copies") == "bulk" else ""  # (opt-in)
    return (f"{device} · CuPy {env.get('cupy_version')} · torch {env.get('torch_version') or 'not installed'}{fa4} · "
            f"cupyflash {env.get('cupyflash_version')} · kernel source {env.get('source_hash')} · "
            f"commit {commit} · {env.get('date')}")
