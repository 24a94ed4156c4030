"""The ``cupyflash`` command: ``info``, ``validate``, ``bench`` and ``autotune``.

Thin shells: each command parses its options, calls the library (cupyflash.environment,
cupyflash.validate_report, cupyflash.bench, ...) and prints. The library's input errors
(ValueError, TypeError) end the command with one ``Error: ...`` line and exit code 2; its
run-time errors (RuntimeError, NotImplementedError) with exit code 1.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from . import __version__, environment, settings, tuning, validate_report
from .device import DeviceLimits, current_device_id, device_limits, gpu_count

PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
VARLEN_HEAD_DIMS = (128,)  # bench --varlen's head dims unless --head-dim is given
DECODE_DTYPES, DECODE_HEAD_DIMS = ("bfloat16",), (128,)  # bench --decode's unless --dtype / --head-dim are given
DECODE_PAGE_SIZES = (16, 256)  # bench --decode's paged layouts unless --paged is given


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


def _aligned(rows: list[tuple[str, Any]], width: int = 15) -> list[str]:
    """label, value lines with the values in one column, at least one space after the longest label."""
    width = max([width] + [len(label) for label, _ in rows])
    return [f"{label:<{width}} {value}" for label, value in rows]


def _entry_count(entries: Any) -> str:
    if not isinstance(entries, int):
        return str(entries)  # "unreadable"
    return f"{entries} entry" if entries == 1 else f"{entries} entries"


def _info_lines(facts: dict[str, Any]) -> list[str]:
    """environment.info()'s facts as aligned label / value lines."""
    rows = [(name.replace("_", " "), facts[name]) for name in environment.VERSION_KEYS]
    rows += [(f"GPU {i}", environment.gpu_line(gpu)) for i, gpu in enumerate(facts["gpus"])] or [
        ("GPUs", "none visible")]
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
    facts = environment.info()
    click.echo(json.dumps(facts, indent=1) if as_json else "\n".join(_info_lines(facts)))


# --------------------------------------------------------------------------- validate


def _output(as_json: bool) -> validate_report.Output:
    """The table's lines on stdout; with --json only its notes, on stderr (stdout holds the JSON)."""
    if as_json:
        return validate_report.Output(line=lambda text: None, note=lambda text: click.echo(text, err=True))
    return validate_report.Output(line=click.echo, note=click.echo)


def _injected(inject_config: str | None) -> AbstractContextManager:
    """--inject-config: the forward config every call uses while the GPU cases run (None: the
    usual choice), as a config's to_dict(); without "kernel", the mma.sync forward's
    (flash_fwd). The CLI's one contact with kernel configs, imported here for that reason."""
    from . import plan

    forced = plan.config_from_dict({"kernel": "flash_fwd", **json.loads(inject_config)}) if inject_config else None
    return plan.forced(fwd=forced)


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
    out = _output(as_json)
    if gpu_count() > 0:
        with _injected(inject_config):
            summary = validate_report.gpu_report(quick, deterministic, out)
    elif require_gpu:
        raise _NoGpu(f"--require-gpu: no CUDA GPU found ({environment.no_gpu_reason()}), "
                     "so no GPU kernels can be validated")
    else:
        ignored = [name for name, given in (("--deterministic", deterministic),
                                            ("--inject-config", inject_config is not None)) if given]
        summary = validate_report.cpu_report(quick, ignored, out)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    if summary["failures"]:
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


def _given(name: str) -> bool:
    """Whether the current command's option `name` was set on the command line (not left to its default)."""
    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def _varlen_conflicts(shape: tuple[int, ...] | None, plot: Path | None) -> None:
    """--varlen times its own batches: the grid's --seqlen, --shape and --plot do not apply."""
    given = [flag for flag, used in (("--seqlen", _given("seqlens")), ("--shape", shape is not None),
                                     ("--plot", plot is not None)) if used]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be combined with --varlen, which times its own batches "
                               "(equal and mixed lengths)")


def _decode_conflicts(shape: tuple[int, ...] | None, varlen: bool, mask: str, which: str) -> None:
    """--decode times its own cells, forward and causal only: the other grids' options do not
    apply, and --pass and the mask flags only where they ask for what it does."""
    given = [flag for flag, used in (("--varlen", varlen), ("--seqlen", _given("seqlens")),
                                     ("--shape", shape is not None), ("--pass", _given("which") and which != "fwd"),
                                     ("--no-causal/--both", _given("mask") and mask != "causal")) if used]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be combined with --decode, which times its own cells "
                               "(query tokens x batch x cache x heads; forward, causal)")


def _decode_only(decode: bool) -> None:
    """--quick and --paged shape the --decode grid and nothing else."""
    given = [flag for flag, name in (("--quick", "quick"), ("--paged", "page_sizes")) if _given(name)]
    if given and not decode:
        raise click.UsageError(f"{', '.join(given)} shape the --decode grid: use with --decode")


def _save(save: Any, stem: Any, report: dict[str, Any], out: Path | None) -> None:
    """save(report, out, stem(report)) when --out is given, and the paths it wrote on stderr."""
    if out is not None:
        saved = save(report, out, stem(report))
        click.echo("saved " + ", ".join(str(path) for path in saved), err=True)


def _bench_varlen(bench_lib: Any, dtypes: tuple[str, ...], head_dims: tuple[int, ...], causals: tuple[bool, ...],
                  passes: tuple[str, ...], runs: int, as_json: bool, out: Path | None) -> None:
    """bench --varlen: the variable-length batches, timed beside the dense call and the torch peer."""
    batches = bench_lib.varlen_batches(dtypes, head_dims if _given("head_dims") else VARLEN_HEAD_DIMS, causals)
    report = bench_lib.run_varlen(batches, passes=passes, runs=runs, progress=_progress)
    click.echo(json.dumps(report, indent=1, default=str) if as_json else bench_lib.format_varlen_table(report))
    _save(bench_lib.save, bench_lib.default_stem, report, out)


def _bench_decode(bench_lib: Any, dtypes: tuple[str, ...], head_dims: tuple[int, ...], page_sizes: tuple[int, ...],
                  quick: bool, runs: int, as_json: bool, out: Path | None, plot: Path | None) -> None:
    """bench --decode: attention_with_kvcache on full caches, contiguous and paged, beside torch's SDPA."""
    pages = tuple(p for p in page_sizes if p > 0) if _given("page_sizes") else DECODE_PAGE_SIZES
    cells = bench_lib.decode_grid(dtypes if _given("dtypes") else DECODE_DTYPES,
                                  head_dims if _given("head_dims") else DECODE_HEAD_DIMS, pages, quick=quick)
    report = bench_lib.run_decode(cells, runs=runs, progress=_progress)
    click.echo(json.dumps(report, indent=1, default=str) if as_json else bench_lib.format_decode_table(report))
    _save(bench_lib.save_decode, bench_lib.decode_stem, report, out)
    if plot is not None:
        click.echo(f"plot {bench_lib.plot_decode(report, plot)}", err=True)


@cli.command()
@click.option("--dtype", "dtypes", multiple=True, default=("float16", "bfloat16"), show_default=True,
              type=click.Choice(["float16", "bfloat16"]), help="Repeat for several (--decode: bfloat16 unless given).")
@click.option("--head-dim", "head_dims", multiple=True, default=(64, 128, 256), show_default=True,
              type=click.IntRange(1, 256), help="Repeat for several (--varlen and --decode: 128 unless given).")
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
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw a TFLOP/s plot to this PNG (--decode: TB/s).")
@click.option("--varlen", is_flag=True,
              help="Time attention_varlen instead of the grid: equal lengths (16x1024, 4x4096, 2x8192; masks as "
                   "--causal/--no-causal/--both) beside the dense call on the same tokens (bar 0.97x), and 64 "
                   "mixed lengths in 128..8192 (causal) beside the dense call at their mean length (bar 0.9x), "
                   "with torch's varlen attention (or SDPA flash per sequence) as the peer.")
@click.option("--decode", is_flag=True,
              help="Time attention_with_kvcache instead of the grid: 1, 2, 4, 8, 16 query tokens x batch 1, 16, 64 x "
                   "a full cache of 4k, 32k, 128k x heads 32/8 and 8/1 (bfloat16, head_dim 128 unless --dtype / "
                   "--head-dim are given), in TB/s beside the GPU's copy bandwidth, with torch's cuDNN and flash SDPA "
                   "as peers; bars: 0.85x copy at one token, 1x cuDNN (2x at 8 and 16 tokens), paged 0.9x contiguous.")
@click.option("--quick", is_flag=True, help="--decode: 1 and 8 query tokens, batch 1 and 64, cache 4k and 32k.")
@click.option("--paged", "page_sizes", multiple=True, type=click.IntRange(min=0), metavar="PAGE_SIZE",
              help="--decode: time paged caches of this page size too, on the 1- and 16-token cells (repeat for "
                   "several; default 16 and 256; 0: none).")
def bench(dtypes: tuple[str, ...], head_dims: tuple[int, ...], seqlens: tuple[int, ...], mask: str, which: str,
          shape: tuple[int, ...] | None, runs: int, as_json: bool, out: Path | None, plot: Path | None,
          varlen: bool, decode: bool, quick: bool, page_sizes: tuple[int, ...]) -> None:
    """Time forward and backward (TFLOP/s) against the peers on the FlashAttention papers' grid
    (or, with --varlen, variable-length batches against the dense call; with --decode, decoding
    against a KV cache, in TB/s)."""
    _decode_only(decode)
    if decode:
        _decode_conflicts(shape, varlen, mask, which)
    if varlen:
        _varlen_conflicts(shape, plot)
    if gpu_count() == 0:
        raise click.ClickException("No CUDA GPU found: cupyflash bench times the GPU kernels and needs one "
                                   "(`cupyflash validate` checks the algorithm on the CPU)")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:  # fail before minutes of timing
        raise click.ClickException("--plot needs matplotlib: pip install 'cupyflash[plot]'")
    from . import bench as bench_lib  # imported here: it needs CuPy and a GPU

    causals = {"causal": (True,), "full": (False,), "both": (False, True)}[mask]
    passes = ("fwd", "bwd") if which == "both" else (which,)
    if decode:
        _bench_decode(bench_lib, dtypes, head_dims, page_sizes, quick, runs, as_json, out, plot)
        return
    if varlen:
        _bench_varlen(bench_lib, dtypes, head_dims, causals, passes, runs, as_json, out)
        return
    shapes = _bench_shapes(bench_lib, dtypes, head_dims, seqlens, causals, shape)
    report = bench_lib.run(shapes, passes=passes, runs=runs, progress=_progress)
    tables = "\n\n".join(bench_lib.format_table(report, p) for p in passes)
    click.echo(json.dumps(report, indent=1, default=str) if as_json else tables)
    _save(bench_lib.save, bench_lib.default_stem, report, out)
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
