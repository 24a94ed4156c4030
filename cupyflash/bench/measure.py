"""run(): for every shape, draw the inputs, compute the reference once, then for every (pass,
impl) set up, check one call's outputs and time it. Failures are recorded in the row, never
raised, so one broken peer cannot stop a grid that takes an hour.

Times are cupyflash.timing.do_bench medians in milliseconds (CUDA events, L2 flushed).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .. import environment, tolerance, validation
from ..device import gpu_count, require_cupy
from ..timing import Timing, do_bench, do_bench_interleaved
from . import check, peers
from .compile_times import measure_compile_times
from .gpu import MAX_MESSAGE, free_device_bytes, free_memory, short
from .grid import IMPL_PASSES, IMPLS, PASSES, BenchShape, tflops

Array = Any  # a cupy.ndarray
Progress = Callable[[str], None]
RULE = "max|ours - ref64| <= 2 * max|baseline - ref64| + floor (cupyflash.tolerance)"


def inputs(shape: BenchShape, seed: int = 0) -> dict[str, Array]:
    """Signed normal q, k, v, dout (B, S, H, D) in shape.dtype on the current GPU."""
    return validation.random_inputs(shape.dims, shape.dims, shape.dtype, seed=seed, xp=require_cupy())


def _row(impl: str, pass_: str, shape: BenchShape) -> dict[str, Any]:
    return {"impl": impl, "pass": pass_, "dtype": shape.dtype, "head_dim": shape.head_dim,
            "seqlen": shape.seqlen, "causal": shape.causal, "batch": shape.batch, "heads": shape.heads,
            "ms": None, "tflops": None, "valid": None, "error": None}


def _add(row: dict[str, Any], fields: dict[str, Any]) -> None:
    """row.update(fields), except that notes accumulate ("; "-separated) instead of replacing."""
    notes = [n for n in (row.get("note"), fields.get("note")) if n]
    row.update(fields)
    if notes:
        row["note"] = "; ".join(notes)


def _warning_texts(caught: list) -> list[str]:
    """torch's warnings, each on one line and cut short, without repeats."""
    return sorted({" ".join(str(w.message).split())[:MAX_MESSAGE] for w in caught})


def measure(impl: str, pass_: str, shape: BenchShape, data: dict[str, Array], ref: check.Reference,
            naive_skip: str | None, runs: int, warmup: int) -> dict[str, Any]:
    """One row: set up, check one call's outputs against ref, then time. naive_skip: why
    naive-cupy does not run for this shape (None: it runs)."""
    row = _row(impl, pass_, shape)
    if impl == "naive-cupy" and naive_skip:
        row["note"] = naive_skip
        return row
    if impl == "naive-cupy":
        runs, warmup = min(runs, peers.NAIVE_MAX_RUNS), min(warmup, peers.NAIVE_MAX_WARMUP)

    def prepare() -> Callable[[], Any]:
        setup = peers.setup(impl, pass_, shape, data)
        _add(row, setup.extra)
        _add(row, check.judge(ref, pass_, setup.outputs, shape.dtype, require_cupy()))
        return setup.fn

    return timed(row, impl, prepare, runs, warmup, lambda ms: tflops(shape, pass_, ms))


def timed(row: dict[str, Any], context: str, prepare: Callable[[], Callable[[], Any]], runs: int, warmup: int,
          rate: Callable[[float], float]) -> dict[str, Any]:
    """Fills row in: prepare() (inside peers.impl_context(context)) sets the call up, adds its
    facts and verdict to row and returns the call, which is then timed; rate(median ms) is its
    TFLOP/s. Any exception becomes row["failure"], with the first warnings caught."""
    caught: list = []
    try:
        with peers.impl_context(context) as caught:
            fn = prepare()
            timing = do_bench(fn, warmup=warmup, runs=runs)
    except Exception as exc:
        row["failure"] = short(exc) + "".join(f" | warning: {t}" for t in _warning_texts(caught)[:3])
        return row
    _record(row, timing, rate)
    if caught:
        row["warnings"] = _warning_texts(caught)
    return row


def timed_together(rows: Sequence[dict[str, Any]], prepares: Sequence[Callable[[], Callable[[], Any]]], runs: int,
                   warmup: int, rates: Sequence[Callable[[float], float]]) -> list[dict[str, Any]]:
    """timed() for calls of cupyflash only (no torch context), timed in alternation
    (do_bench_interleaved) so that their ratio does not depend on which ran later. A prepare
    that raises fails its own row; the others are still timed together."""
    ready: list[tuple[dict[str, Any], Callable[[], Any], Callable[[float], float]]] = []
    for row, prepare, rate in zip(rows, prepares, rates, strict=True):
        try:
            ready.append((row, prepare(), rate))
        except Exception as exc:
            row["failure"] = short(exc)
    try:
        timings = do_bench_interleaved([fn for _, fn, _ in ready], warmup=warmup, runs=runs) if ready else []
    except Exception as exc:
        for row, _, _ in ready:
            row["failure"] = short(exc)
        return list(rows)
    for (row, _, rate), timing in zip(ready, timings):
        _record(row, timing, rate)
        row["timed"] = "interleaved"
    return list(rows)


def _record(row: dict[str, Any], timing: Timing, rate: Callable[[float], float]) -> None:
    """A timing's fields in a row: ms (median), ms_min, ms_max, runs and tflops (rate of the median)."""
    row.update(ms=timing.median_ms, ms_min=timing.min_ms, ms_max=timing.max_ms, runs=timing.runs,
               tflops=rate(timing.median_ms))


def describe(row: dict[str, Any]) -> str:
    """One progress line for a finished row."""
    shape = BenchShape(row["dtype"], row["head_dim"], row["seqlen"], row["causal"], row["batch"], row["heads"])
    return describe_outcome(f"{shape.id} {row['impl']} {row['pass']}: ", row)


def describe_outcome(head: str, row: dict[str, Any]) -> str:
    """head, then what became of the row: its failure, its note, or its time, rate and verdict."""
    if row.get("failure"):
        return head + "failed: " + row["failure"]
    if row["ms"] is None:
        return head + str(row.get("note"))
    verdict = {True: "valid", False: "INVALID", None: "not validated"}[row["valid"]]
    error = f" (error {row['error']:.2f} of allowed)" if isinstance(row.get("error"), float) else ""
    return head + f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s, {verdict}{error}"


def _check_run_args(passes: Sequence[str], impls: Sequence[str], runs: int, warmup: int) -> None:
    unknown = [p for p in passes if p not in PASSES] + [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown pass or impl {unknown}; passes are {PASSES}, impls are {IMPLS}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if gpu_count() == 0:
        raise RuntimeError("cupyflash.bench.run needs a CUDA GPU and CuPy; none is visible")


def _settings(passes: Sequence[str], impls: Sequence[str], runs: int, warmup: int) -> dict[str, Any]:
    """The report's "settings": what was run and every threshold that shaped the rows."""
    return {"runs": runs, "warmup": warmup, "passes": list(passes), "impls": list(impls),
            "tolerance": {"rule": RULE, "floor_eps": dict(tolerance.FLOOR_EPS)}, "check_rows": check.CHECK_ROWS,
            "reference_memory_fraction": check.REFERENCE_MEMORY_FRACTION,
            "naive_memory_fraction": peers.NAIVE_MEMORY_FRACTION, "naive_max_runs": peers.NAIVE_MAX_RUNS}


def run(shapes: Sequence[BenchShape], *, passes: Sequence[str] = PASSES, impls: Sequence[str] | None = None,
        runs: int = 20, warmup: int = 3, progress: Progress | None = None,
        compile_times: bool = False) -> dict[str, Any]:
    """Validate, then time every (shape, pass, impl) on the current GPU; returns the report.

    Report: {"environment": environment.record(), "rows": [...], "compile_times": [...],
    "settings": {...}}. A row: impl, pass, dtype, head_dim, seqlen, causal, batch, heads, ms
    (median, milliseconds), tflops, valid (True / False / None = not checked), error (the worst
    tensor's max|ours - ref64| as a fraction of what cupyflash.tolerance allows: <= 1 passes),
    and where they apply: ms_min, ms_max, runs (timed runs: `runs`, at most NAIVE_MAX_RUNS for
    naive-cupy), errors and allowed (per tensor, absolute), mismatches (tolerance's message,
    worst coordinate included, per failing tensor), check ("full" or "slice", see bench.check),
    note, failure (the exception text when an impl raised), warnings (torch's), and for
    cupyflash*: first_call_ms (wall time of the first call, NVRTC compile and module load
    included), new_cubins (kernels NVRTC compiled during it; None with the disk cache off),
    peak_extra_mb (MiB CuPy allocated at the peak of one call, outputs included) and output_mb
    (MiB of the returned arrays): peak_extra_mb - output_mb is the scratch, O(seqlen), never
    O(seqlen²). naive-cupy rows carry peak_extra_mb and output_mb too, for contrast (its saved
    P excluded). compile_times=True adds measure_compile_times() for the shapes' dtypes and
    head dims. progress(message) is called once per (shape, impl, pass) with the result.
    """
    impls = peers.available_impls() if impls is None else tuple(impls)
    _check_run_args(passes, impls, runs, warmup)
    say = progress or (lambda message: None)
    jobs = [(p, i) for p in passes for i in impls if p in IMPL_PASSES.get(i, PASSES)]
    report = {"environment": environment.record(), "rows": [], "compile_times": [],
              "settings": _settings(passes, impls, runs, warmup)}
    if compile_times:  # first, while this process has compiled nothing (build.py memoizes programs)
        dtypes = sorted({s.dtype for s in shapes})
        report["compile_times"] = measure_compile_times(dtypes, sorted({s.head_dim for s in shapes}))
    for n, shape in enumerate(shapes):
        data = inputs(shape)
        free = free_device_bytes()  # before the reference, which holds its tensors until the next shape
        naive_skip = peers.naive_skip_reason(shape, free)
        ref = check.reference_for(data, shape.causal, shape.dtype, passes, free, require_cupy())
        for m, (pass_, impl) in enumerate(jobs):
            row = measure(impl, pass_, shape, data, ref, naive_skip, runs, warmup)
            report["rows"].append(row)
            free_memory()
            say(f"[{n * len(jobs) + m + 1}/{len(shapes) * len(jobs)}] {describe(row)}")
        del data, ref
        free_memory()
    return report
