"""The tuned-config cache: one JSON file per GPU model in settings.tuning_dir().

A file holds a header (GPU, compute capability, CUDA runtime and NVRTC versions, cupyflash
version, kernel source hash) and the winners per problem bucket. A file whose header does not
match this process (a new driver, edited kernels) is stale: it is ignored with a warning, as
is a corrupt one; neither ever raises. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

from . import __version__, settings
from .device import DeviceLimits
from .problem import Problem

FORMAT = 2  # 2: each config names its kernel family ("kernel"), 2026-12-02
# path -> (mtime, entries, time.monotonic() of the last stat); mtime -1 when the file is absent
_files: dict[Path, tuple[float, dict[str, Any] | None, float]] = {}
# attention() looks its config up on every call; a stat per call cost ~10 us of host time, so a
# file written by another process (a concurrent `cupyflash autotune`) is noticed within this many
# seconds. store() and clear() in this process take effect at once.
RECHECK_SECONDS = 1.0
# Launch plans (plan.py) keep the config chosen when they were built; they compare this number
# with the one they were built under. It changes whenever the entries load_entries() returns for
# some GPU change: store(), clear(), a re-read that found a new file, or a new tuning folder.
_generation = 0
_generations = itertools.count(1)  # next() on it is atomic: threads never hand out one number twice
# limits -> the entries object (None for no file) load_entries(limits) last answered with
_answered: dict[DeviceLimits, dict[str, Any] | None] = {}


def seqlen_bucket(seqlen: int) -> int:
    """Power of two at or above seqlen, clamped to [128, 16384]: tiles behave alike within one."""
    bucket = 128
    while bucket < min(seqlen, 16384):
        bucket *= 2
    return bucket


def bucket_key(kind: str, problem: Problem, kernel_dim: int) -> str:
    masked = "causal" if problem.causal else ("window" if problem.window != (-1, -1) else "full")
    gqa = "gqa" if problem.group_size > 1 else "mha"
    return f"{kind}/{problem.dtype}/d{kernel_dim}/{masked}/s{seqlen_bucket(max(problem.seqlen_q, problem.seqlen_k))}/{gqa}"


def header(limits: DeviceLimits) -> dict[str, Any]:
    from . import build  # imported late: build needs CuPy only when a GPU path runs
    from .device import require_cupy

    runtime = require_cupy().cuda.runtime
    return {"format": FORMAT, "gpu": limits.name, "arch": limits.arch, "cuda_runtime": runtime.runtimeGetVersion(),
            "cuda_driver": runtime.driverGetVersion(), "nvrtc": list(build.nvrtc_version()),
            "cupyflash": __version__, "kernel_source": build.source_hash()}


def tuning_file(limits: DeviceLimits) -> Path:
    """This GPU's file: the tuning folder, the GPU's name and its architecture (no CUDA call)."""
    return _tuning_file(settings.tuning_dir(), limits)


def tuning_files() -> list[Path]:
    """Every tuning file in the tuning folder, whatever GPU it was made for, sorted by name."""
    return sorted(settings.tuning_dir().glob("*.json"))


@functools.lru_cache(maxsize=32)  # looked up on every attention() call
def _tuning_file(directory: Path, limits: DeviceLimits) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", limits.name).strip("_") or "gpu"
    return directory / f"{slug}-{limits.arch}.json"


def _read_entries(path: Path, expected_header: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        if data.get("header") != expected_header:
            warnings.warn(f"ignoring tuned configs in {path}: made for {data.get('header')}, this process is "
                          f"{expected_header}; run `cupyflash autotune` again", RuntimeWarning, stacklevel=3)
            return None
        return dict(data["entries"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"ignoring unreadable tuned-config file {path}: {error}", RuntimeWarning, stacklevel=3)
        return None


def file_entries(path: Path) -> dict[str, Any] | None:
    """The entries one tuning file holds, as stored: the header is not compared with this
    process, so this needs no GPU (and does not say whether attention() would use them).
    None for a file that cannot be read or holds no entries object; never raises."""
    try:
        entries = json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(entries) if isinstance(entries, dict) else None


def stored_entries(limits: DeviceLimits | None = None) -> dict[Path, dict[str, Any] | None]:
    """Tuning file -> its entries. With limits, this GPU's file as attention() sees it (a stale
    or corrupt one warns and holds {}); with None, every file in the tuning folder as stored
    (file_entries: None for an unreadable one). A missing file is left out."""
    if limits is not None:
        path = tuning_file(limits)
        return {path: load_entries(limits)} if path.exists() else {}
    return {path: file_entries(path) for path in tuning_files()}


def generation() -> int:
    """A number that changes whenever the tuned entries of some GPU change (see _generation)."""
    return _generation


def _entries_changed() -> None:
    global _generation
    _generation = next(_generations)


def load_entries(limits: DeviceLimits) -> dict[str, Any]:
    """Bucket -> config dict for this GPU, {} when there is no usable file. Re-read on change."""
    path = tuning_file(limits)
    cached = _files.get(path)
    now = time.monotonic()
    if cached is not None and now - cached[2] < RECHECK_SECONDS:
        return _answer(limits, cached[1])
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = -1.0
    if mtime < 0:
        entries = None
    elif cached is not None and cached[0] == mtime:
        entries = cached[1]
    else:
        entries = _read_entries(path, header(limits))
    _files[path] = (mtime, entries, now)
    return _answer(limits, entries)


def _answer(limits: DeviceLimits, entries: dict[str, Any] | None) -> dict[str, Any]:
    """entries or {}, noting a change of answer for these limits: a re-read file is a new object,
    as is another folder's file (CUPYFLASH_TUNING_DIR changed); an unchanged file is the same
    object. The first answer changes nothing: a plan reads the entries before it is built."""
    if _answered.get(limits, entries) is not entries:
        _entries_changed()
    _answered[limits] = entries
    return entries or {}


def lookup(kind: str, problem: Problem, kernel_dim: int, limits: DeviceLimits) -> dict[str, Any] | None:
    """The stored config dict (a config's to_dict()) of the problem's bucket, or None. plan.py
    makes the config of it and checks that it fits."""
    entry = load_entries(limits).get(bucket_key(kind, problem, kernel_dim))
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        if entry is not None:
            warnings.warn(f"ignoring malformed tuned entry {entry!r}", RuntimeWarning, stacklevel=2)
        return None
    return entry["config"]


def store(limits: DeviceLimits, bucket: str, config: Any, record: dict[str, Any]) -> Path:
    """Adds or replaces one bucket's winner; the file is rewritten atomically."""
    from .build import write_atomic

    path = tuning_file(limits)
    entries = load_entries(limits)
    entries[bucket] = {"config": config.to_dict(), **record}
    data = {"header": header(limits), "entries": entries}
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())
    _files.pop(path, None)
    _entries_changed()
    return path


def clear(limits: DeviceLimits | None = None) -> list[Path]:
    """Removes this GPU's tuning file, or every GPU's (tuning_files()) when limits is None;
    returns the paths it removed."""
    paths = [tuning_file(limits)] if limits is not None else tuning_files()
    removed = []
    for path in paths:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        _files.pop(path, None)
    _entries_changed()
    return removed
