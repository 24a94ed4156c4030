"""The ``cupyflash`` command: ``info``, ``validate``, ``bench`` and ``autotune``.

Thin shells: each command parses its options, calls the library (cupyflash.validation,
cupyflash.bench, ...) and prints. The library's input errors (ValueError, TypeError) end the
command with one ``Error: ...`` line and exit code 2; its run-time errors (RuntimeError,
NotImplementedError) with exit code 1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, build, selection, settings, tuning, validation
from .config import TileConfig
from .device import DeviceLimits, cupy_module, current_device_id, device_limits, gpu_count

NO_GPU_VALIDATE = ("No CUDA GPU found: GPU kernels were NOT validated "
                   "(only the NumPy tiled algorithm was checked)")
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
CASE_WIDTH = 48  # widest gpu_matrix id ("bfloat16-d128-causal-500x300-g1-b2-w32_-1") plus room


class _LibraryError(click.ClickException):
    """A library exception shown as ``Error: <message>`` with the exit code of its kind."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error) or type(error).__name__)
        # Bad arguments read like a usage error (2); a failure to run is 1.
        self.exit_code = 2 if isinstance(error, (ValueError, TypeError)) else 1


class _NoGpu(click.ClickException):
    """A command told to run on a GPU found none: exit code 2, like a usage error."""

    exit_code = 2


class _Group(click.Group):
    """Turns the library's errors into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own (Exit and Abort are RuntimeErrors too)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
            raise _LibraryError(error) from error


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cupyflash")
def cli() -> None:
    """Exact FlashAttention for CuPy: inspect the setup, validate the kernels, benchmark them."""


def main() -> None:
    """Console-script entry point (``cupyflash = cupyflash.cli:main``)."""
    cli(prog_name="cupyflash")


# --------------------------------------------------------------------------- info


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _probe(read: Callable[[], Any]) -> Any:
    """read(), or "unavailable (reason)": without a GPU, a driver or CuPy some facts are missing."""
    try:
        return read()
    except Exception as error:  # a fact that cannot be read is reported, never fatal
        return f"unavailable ({_reason(error)})"


def _cuda_version(number: int) -> str:
    """CUDA's integer version (12090) as text (12.9)."""
    if number == 0:  # what cudaDriverGetVersion reports when no driver is installed
        raise RuntimeError("no CUDA driver found")
    return f"{number // 1000}.{number % 1000 // 10}"


def _runtime() -> Any:
    """CuPy's CUDA runtime module; a short reason when CuPy itself is missing."""
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError("CuPy not installed")
    return cupy.cuda.runtime


def _nvrtc_version() -> str:
    _runtime()  # without CuPy, say so rather than repeat the install hint
    major, minor = build.nvrtc_version()
    return f"{major}.{minor}"


def _versions() -> dict[str, Any]:
    cupy = cupy_module()
    return {
        "cupyflash": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": cupy.__version__ if cupy is not None else "not installed",
        "cuda_runtime": _probe(lambda: _cuda_version(_runtime().runtimeGetVersion())),
        "cuda_driver": _probe(lambda: _cuda_version(_runtime().driverGetVersion())),
        "nvrtc": _probe(_nvrtc_version),
    }


def _gpu(device_id: int) -> dict[str, Any]:
    limits = device_limits(device_id)
    major, minor = limits.compute_capability
    return {"id": device_id, "name": limits.name, "compute_capability": f"{major}.{minor}", "arch": limits.arch,
            "sm_count": limits.sm_count, "smem_per_block_optin": limits.smem_per_block_optin,
            "smem_per_sm": limits.smem_per_sm}


def _tuned_file(path: Path) -> dict[str, Any]:
    """A tuning file's name and entry count; "unreadable" for a corrupt one (never raises)."""
    entries = tuning.file_entries(path)
    return {"file": path.name, "entries": "unreadable" if entries is None else len(entries)}


def _caches() -> dict[str, Any]:
    """The cache folders; kernel_cache_problem is None when cubins can be cached, else why not."""
    kernels = settings.kernel_cache_dir()
    return {"kernel_cache_dir": str(kernels), "cubins": len(list(kernels.glob("*.cubin"))),
            "kernel_cache_problem": build.disk_cache_problem(),
            "tuning_dir": str(settings.tuning_dir()), "tuned": [_tuned_file(p) for p in tuning.tuning_files()]}


def _info() -> dict[str, Any]:
    return {
        **_versions(),
        "gpus": [_probe(lambda i=i: _gpu(i)) for i in range(gpu_count())],
        "kernel_sources": _probe(lambda: str(build.kernel_dir())),
        "kernel_source_hash": _probe(build.source_hash),
        **_caches(),
    }


def _gpu_line(gpu: Any) -> str:
    if isinstance(gpu, str):
        return gpu
    return (f"{gpu['name']}, {gpu['arch']} (compute capability {gpu['compute_capability']}), "
            f"{gpu['sm_count']} SMs, shared memory {gpu['smem_per_block_optin']} B per block (opt-in), "
            f"{gpu['smem_per_sm']} B per SM")


def _aligned(rows: list[tuple[str, Any]], width: int = 15) -> list[str]:
    """label, value lines with the values in one column, at least one space after the longest label."""
    width = max([width] + [len(label) for label, _ in rows])
    return [f"{label:<{width}} {value}" for label, value in rows]


def _entry_count(entries: Any) -> str:
    if not isinstance(entries, int):
        return str(entries)  # "unreadable"
    return f"{entries} entry" if entries == 1 else f"{entries} entries"


def _info_lines(facts: dict[str, Any]) -> list[str]:
    rows = [(name.replace("_", " "), facts[name]) for name in
            ("cupyflash", "python", "numpy", "cupy", "cuda_runtime", "cuda_driver", "nvrtc")]
    rows += [(f"GPU {i}", _gpu_line(gpu)) for i, gpu in enumerate(facts["gpus"])] or [("GPUs", "none visible")]
    rows += [("kernel sources", facts["kernel_sources"]), ("source hash", facts["kernel_source_hash"]),
             ("kernel cache", f"{facts['kernel_cache_dir']} ({facts['cubins']} cubins)")]
    if facts["kernel_cache_problem"] is not None:
        rows.append(("  WARNING", facts["kernel_cache_problem"]))
    rows.append(("tuning dir", facts["tuning_dir"]))
    # The files get their own column: a long GPU name must not push every other value right.
    tuned = [(f"  {t['file']}", _entry_count(t["entries"])) for t in facts["tuned"]]
    return _aligned(rows) + (_aligned(tuned) if tuned else _aligned([("  tuned configs", "none")]))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def info(as_json: bool) -> None:
    """Versions, GPUs, kernel sources and the on-disk caches."""
    facts = _info()
    click.echo(json.dumps(facts, indent=1) if as_json else "\n".join(_info_lines(facts)))


# --------------------------------------------------------------------------- validate


def _number(value: float) -> float | str:
    """JSON has no inf or nan: those become strings."""
    return value if math.isfinite(value) else str(value)


class _Table:
    """Streams table lines as they come, or collects rows for one JSON object at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.rows: list[dict[str, Any]] = []

    def line(self, text: str) -> None:
        if not self.as_json:
            click.echo(text)

    def row(self, row: dict[str, Any], text: str) -> None:
        self.rows.append(row)
        self.line(text)

    def finish(self, **summary: Any) -> None:
        if self.as_json:
            click.echo(json.dumps({**summary, "rows": self.rows}, indent=1))


def _gpu_case_rows(table: _Table, case: validation.Case, deterministic: bool) -> int:
    """Runs one case, adds a row per tensor; returns its number of failed tensors."""
    try:
        results = validation.run_gpu_case(case, deterministic=deterministic)
    except Exception as error:  # a crash or a compile error fails this case; the rest still run
        message = f"{type(error).__name__}: {_reason(error)}"
        table.row({"case": case.id, "tensor": None, "ok": False, "exception": message},
                  f"{case.id:<{CASE_WIDTH}} ERROR  {message}")
        return 1
    for r in results:
        row = {"case": case.id, "tensor": r.name, "error": _number(r.error),
               "baseline_error": _number(r.baseline_error), "ratio": _number(r.ratio), "ok": r.ok,
               **({} if r.ok else {"message": r.message()})}
        table.row(row, f"{case.id:<{CASE_WIDTH}} {r.name:<6} {r.error:>10.3e} {r.baseline_error:>10.3e} "
                       f"{r.ratio:>7.2f}  {'pass' if r.ok else 'FAIL'}")
        if not r.ok:
            table.line(f"    {r.message()}")  # the worst coordinate and both errors
    return sum(not r.ok for r in results)


def _validate_gpu(quick: bool, deterministic: bool, as_json: bool = False) -> int:
    """The kernels against the float64 reference (tolerance rule); returns the failure count."""
    table, cases = _Table(as_json), validation.gpu_matrix(quick)
    device_id = current_device_id()
    gpu, cupy_version, source = _probe(lambda: _gpu(device_id)), _versions()["cupy"], _probe(build.source_hash)
    table.line(f"GPU {device_id}: {_gpu_line(gpu)}; CuPy {cupy_version}; kernel source hash {source}; "
               f"{len(cases)} cases; deterministic={deterministic}")
    table.line("pass: error <= 2 x baseline error + floor (error = max|ours - float64 reference|)")
    table.line(f"{'case':<{CASE_WIDTH}} {'tensor':<6} {'error':>10} {'baseline':>10} {'ratio':>7}  result")
    failures = sum(_gpu_case_rows(table, case, deterministic) for case in cases)
    table.line(f"{len(cases)} cases, {len(table.rows)} rows: "
               + (f"{failures} FAILED" if failures else "all passed") + "; GPU kernels validated: yes")
    table.finish(gpu=True, gpu_kernels_validated=True, device=gpu, cupy=cupy_version, kernel_source_hash=source,
                 deterministic=deterministic, ignored_options=[], cases=len(cases), failures=failures)
    return failures


def _note(table: _Table, text: str) -> None:
    """A line that must not be missed: in the table, or on stderr when stdout is one JSON object."""
    table.line(text)
    if table.as_json:
        click.echo(text, err=True)


def _validate_cpu(quick: bool, as_json: bool, ignored: list[str]) -> int:
    """Without a GPU: the tiled NumPy algorithm against the naive one; returns the failure count.
    ignored: the options given that apply only to the GPU kernels."""
    table, cases = _Table(as_json), validation.cpu_matrix(quick)
    for option in ignored:
        _note(table, f"{option} ignored: it applies to the GPU kernels, and without a GPU none are validated")
    table.line("No CUDA GPU: checking the NumPy tiled algorithm (reference_tiled) against naive attention "
               f"in float64; pass: every max |tiled - naive| <= {validation.CPU_TOLERANCE:g}")
    tensors = ("out", "lse", "dq", "dk", "dv")
    table.line(f"{'case':<{CASE_WIDTH}} " + " ".join(f"{t:>8}" for t in tensors) + "  result")
    failures = 0
    for case in cases:
        errors = validation.run_cpu_case(case)
        ok = all(errors[t] <= validation.CPU_TOLERANCE for t in tensors)  # False for nan too
        failures += not ok
        table.row({"case": case.id, **{t: _number(errors[t]) for t in tensors}, "ok": ok},
                  f"{case.id:<{CASE_WIDTH}} " + " ".join(f"{errors[t]:>8.1e}" for t in tensors)
                  + f"  {'pass' if ok else 'FAIL'}")
    table.line(f"{len(cases)} cases: " + (f"{failures} FAILED" if failures else "all passed")
               + "; GPU kernels validated: no")
    _note(table, NO_GPU_VALIDATE)
    table.finish(gpu=False, gpu_kernels_validated=False, note=NO_GPU_VALIDATE, ignored_options=ignored,
                 tolerance=validation.CPU_TOLERANCE, cases=len(cases), failures=failures)
    return failures


def _no_gpu_reason() -> str:
    """Why gpu_count() is 0, in a few words."""
    try:
        count = _runtime().getDeviceCount()
    except Exception as error:  # no CuPy, no driver: its message is the reason
        return _reason(error)
    return f"the CUDA runtime sees {count} devices"


@cli.command()
@click.option("--quick", is_flag=True, help="A smaller matrix (fewer head dims and lengths).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--deterministic", is_flag=True,
              help="Validate the deterministic backward (dQ in its own pass). GPU kernels only: "
                   "without a GPU it is ignored, and the output says so.")
@click.option("--require-gpu", is_flag=True,
              help="Exit 2 when there is no CUDA GPU, instead of checking only the NumPy algorithm (for CI).")
@click.option("--inject-config", hidden=True, metavar="JSON",
              help='Force a forward config, e.g. {"block_m": 64, "block_n": 64, "num_warps": 4, "stages": 1} '
                   "(tests use it to check that a broken config fails validation).")
def validate(quick: bool, as_json: bool, deterministic: bool, require_gpu: bool, inject_config: str | None) -> None:
    """Check the GPU kernels against the float64 reference (or, without a GPU, the tiled
    NumPy algorithm against the naive one: then the GPU kernels are NOT validated, and the
    summary says "GPU kernels validated: no", in JSON gpu_kernels_validated false).
    Exit code 1 when anything fails; 2 with --require-gpu and no GPU."""
    if gpu_count() > 0:
        forced = TileConfig(**json.loads(inject_config)) if inject_config else None
        with selection.forced(fwd=forced):
            failures = _validate_gpu(quick, deterministic, as_json)
    elif require_gpu:
        raise _NoGpu(f"--require-gpu: no CUDA GPU found ({_no_gpu_reason()}), so no GPU kernels can be validated")
    else:
        ignored = [name for name, given in (("--deterministic", deterministic),
                                            ("--inject-config", inject_config is not None)) if given]
        failures = _validate_cpu(quick, as_json, ignored)
    if failures:
        raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------- bench


def _parse_shape(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(n) for n in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise click.BadParameter(f"{value!r} must be four positive integers B,S,H,D (batch, seqlen, heads, head_dim)")
    return shape


def _progress(*parts: Any) -> None:
    click.echo(" ".join(str(part) for part in parts), err=True)


def _bench_shapes(bench: Any, dtypes: tuple[str, ...], head_dims: tuple[int, ...], seqlens: tuple[int, ...],
                  causals: tuple[bool, ...], shape: tuple[int, ...] | None) -> list[Any]:
    """The paper grid, or one custom (B, S, H, D) shape for each dtype and mask."""
    if shape is None:
        return bench.paper_grid(dtypes, head_dims, seqlens, causals)
    batch, seqlen, heads, head_dim = shape
    return [bench.BenchShape(dtype, head_dim, seqlen, causal, batch, heads) for dtype in dtypes for causal in causals]


@cli.command()
@click.option("--dtype", "dtypes", multiple=True, default=("float16", "bfloat16"), show_default=True,
              type=click.Choice(["float16", "bfloat16"]), help="Repeat for several.")
@click.option("--head-dim", "head_dims", multiple=True, default=(64, 128, 256), show_default=True,
              type=click.IntRange(1, 256), help="Repeat for several.")
@click.option("--seqlen", "seqlens", multiple=True, default=PAPER_SEQLENS, show_default=True,
              type=click.IntRange(min=1), help="Repeat for several; batch = 16384 tokens / seqlen.")
@click.option("--causal", "mask", flag_value="causal", help="Causal only.")
@click.option("--no-causal", "mask", flag_value="full", help="Non-causal only.")
@click.option("--both", "mask", flag_value="both", default=True, help="Causal and non-causal (default).")
@click.option("--pass", "which", type=click.Choice(["fwd", "bwd", "both"]), default="both", show_default=True)
@click.option("--shape", callback=_parse_shape, metavar="B,S,H,D",
              help="One custom shape instead of the head-dim x seqlen grid (dtypes and masks still apply).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per shape.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Save the report in this folder.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Draw a TFLOP/s plot to this PNG.")
def bench(dtypes: tuple[str, ...], head_dims: tuple[int, ...], seqlens: tuple[int, ...], mask: str, which: str,
          shape: tuple[int, ...] | None, runs: int, as_json: bool, out: Path | None, plot: Path | None) -> None:
    """Time forward and backward (TFLOP/s) against the peers on the FlashAttention papers' grid."""
    if gpu_count() == 0:
        raise click.ClickException("No CUDA GPU found: cupyflash bench times the GPU kernels and needs one "
                                   "(`cupyflash validate` checks the algorithm on the CPU)")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:  # fail before minutes of timing
        raise click.ClickException("--plot needs matplotlib: pip install 'cupyflash[plot]'")
    from . import bench as bench_lib  # imported here: it needs CuPy and a GPU

    causals = {"causal": (True,), "full": (False,), "both": (False, True)}[mask]
    passes = ("fwd", "bwd") if which == "both" else (which,)
    shapes = _bench_shapes(bench_lib, dtypes, head_dims, seqlens, causals, shape)
    report = bench_lib.run(shapes, passes=passes, runs=runs, progress=_progress)
    tables = "\n\n".join(bench_lib.format_table(report, p) for p in passes)
    click.echo(json.dumps(report, indent=1, default=str) if as_json else tables)
    if out is not None:
        saved = bench_lib.save(report, out, bench_lib.default_stem(report))
        click.echo("saved " + ", ".join(str(path) for path in saved), err=True)
    if plot is not None:
        click.echo(f"plot {bench_lib.plot(report, plot)}", err=True)


# --------------------------------------------------------------------------- autotune


def _this_gpu() -> DeviceLimits | None:
    """The current GPU, whose tuning file --show and --clear act on; None without a GPU."""
    return device_limits(current_device_id()) if gpu_count() > 0 else None


def _tuned_rows(stored: dict[Path, dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"file": path.name, "bucket": bucket, **(entry if isinstance(entry, dict) else {"entry": entry})}
            for path, entries in stored.items() for bucket, entry in sorted((entries or {}).items())]


def _tuned_lines(stored: dict[Path, dict[str, Any] | None]) -> list[str]:
    """Per file, its entry count, then one line per bucket with what was stored for it."""
    lines = []
    for path, entries in stored.items():
        lines.append(f"{path.name}: " + ("unreadable, ignored" if entries is None else _entry_count(len(entries))))
        lines += [f"  {bucket:<38} {json.dumps(entry, sort_keys=True)}"
                  for bucket, entry in sorted((entries or {}).items())]
    return lines


def _show_tuned(limits: DeviceLimits | None, as_json: bool) -> None:
    """--show: this GPU's tuned configs, or without a GPU every GPU's files in the tuning folder.
    With --json, stdout holds only the JSON list and the notes go to stderr."""
    stored, folder = tuning.stored_entries(limits), settings.tuning_dir()
    if limits is None:
        click.echo(f"No CUDA GPU found: listing the tuning files of every GPU in {folder} as stored "
                   "(attention() uses one only on its GPU, with the versions it was tuned under)", err=as_json)
    if not stored:
        owner = "any GPU" if limits is None else f"{limits.name} ({limits.arch})"
        click.echo(f"no tuned configs for {owner} in {folder}", err=as_json)
    if as_json:
        for path in (path for path, entries in stored.items() if entries is None):
            click.echo(f"{path.name}: unreadable, ignored", err=True)
        click.echo(json.dumps(_tuned_rows(stored), indent=1))
    elif stored:
        click.echo("\n".join(_tuned_lines(stored)))


def _clear_tuned(limits: DeviceLimits | None, as_json: bool) -> None:
    """--clear: removes this GPU's tuning file, or without a GPU every GPU's in the tuning folder."""
    removed, folder = tuning.clear(limits), settings.tuning_dir()
    if as_json:
        click.echo(json.dumps([str(path) for path in removed], indent=1))
        return
    what = "no tuning files" if limits is None else f"no tuning file for {limits.name} ({limits.arch})"
    lines = [f"removed {path}" for path in removed] or [f"{what} in {folder}: nothing removed"]
    if limits is None:
        lines.insert(0, f"No CUDA GPU found: removing the tuning files of every GPU in {folder}")
    click.echo("\n".join(lines))


def _autotune_table(results: list[Any]) -> list[str]:
    lines = [f"{'bucket':<46} {'heuristic':>10} {'tuned':>8}  config (TFLOP/s on the bucket's problem)"]
    for r in results:
        lines.append(f"{r.bucket.key:<46} {r.tflops(r.heuristic_ms):>10.1f} {r.tflops(r.best_ms):>8.1f}  {r.best}")
    return lines


def _tune(tuner: Any, buckets: list[Any], limits: DeviceLimits, as_json: bool) -> None:
    """Tunes the buckets (tuner: cupyflash.autotune) with a progress bar on stderr, then prints the winners."""
    results: list[Any] = []
    with click.progressbar(length=tuner.candidate_count(buckets), label=f"tuning {len(buckets)} buckets",
                           show_eta=True, file=click.get_text_stream("stderr")) as bar:
        def progress(message: str) -> None:
            if not message.startswith("compiling"):
                bar.update(1)
        try:
            tuner.tune(buckets, progress=progress, on_result=results.append)
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: {len(results)} buckets finished and kept", err=True)
    if as_json:
        click.echo(json.dumps([{"bucket": r.bucket.key, "heuristic": str(r.heuristic), "tuned": str(r.best),
                                "heuristic_tflops": r.tflops(r.heuristic_ms), "tuned_tflops": r.tflops(r.best_ms)}
                               for r in results], indent=1))
    else:
        click.echo("\n".join(_autotune_table(results)))
        click.echo(f"stored in {tuning.tuning_file(limits)}")


@cli.command()
@click.option("--pass", "kinds", multiple=True, type=click.Choice(["fwd", "bwd"]), help="Default: both.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float16", "bfloat16"]), help="Default: both.")
@click.option("--head-dim", "head_dims", multiple=True, type=int, help="Default: 64, 128, 256.")
@click.option("--seqlen", "seqlens", multiple=True, type=int, help="Default: 2048, 8192.")
@click.option("--causal", "mask", flag_value="causal", help="Causal only.")
@click.option("--no-causal", "mask", flag_value="full", help="Non-causal only.")
@click.option("--both", "mask", flag_value="both", default=True, help="Causal and non-causal (default).")
@click.option("--show", is_flag=True, help="List this GPU's tuned configs and exit; without a GPU, those of "
                                           "every GPU in the tuning folder.")
@click.option("--clear", is_flag=True, help="Remove this GPU's tuning file and exit; without a GPU, every "
                                            "GPU's tuning file in the tuning folder.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def autotune(kinds: tuple[str, ...], dtypes: tuple[str, ...], head_dims: tuple[int, ...], seqlens: tuple[int, ...],
             mask: str, show: bool, clear: bool, as_json: bool) -> None:
    """Time every feasible config for each problem bucket on this GPU and cache the winners
    (validated against the reference first); attention() then uses them. Interrupting keeps
    the buckets already finished. Tuning needs a CUDA GPU; --show and --clear only read or
    remove files (one per GPU model, in the tuning folder) and work without one."""
    if show and clear:
        raise click.UsageError("--show and --clear exclude each other: pass one of them")
    if show or clear:
        (_show_tuned if show else _clear_tuned)(_this_gpu(), as_json)
        return
    if gpu_count() == 0:
        raise click.ClickException("autotune needs a CUDA GPU to time the kernels; none was found "
                                   "(--show and --clear work without one)")
    from . import autotune as tuner  # imported here: tuning needs CuPy and a GPU

    causal = {"causal": (True,), "full": (False,), "both": (False, True)}[mask]
    buckets = [tuner.Bucket(k, d, h, c, s) for k in kinds or ("fwd", "bwd") for d in dtypes or ("float16", "bfloat16")
               for h in head_dims or (64, 128, 256) for c in causal for s in seqlens or (2048, 8192)]
    _tune(tuner, buckets, device_limits(current_device_id()), as_json)


if __name__ == "__main__":
    main()
