"""The tables of `cupyflash validate`, built from cupyflash.validation's results.

On a GPU: one row per (case, tensor), the kernels against the float64 reference with the
tolerance rule. Without one: one row per case, the tiled NumPy algorithm against the naive one.
Variable-length cases (ids "varlen-...") follow the dense ones in the same table: on a GPU
(validation.varlen_matrix) one row per (case, sequence, tensor), the tensor named
"<name>@s<sequence>"; without one (validation.cpu_varlen_matrix), the tiled algorithm and the
reference run per sequence against naive attention over the packed tokens with a
block-diagonal mask.
Each table is streamed line by line while the cases run (a full matrix takes minutes) and
collected as rows for the JSON summary; cli.py only decides where the lines go and prints.

    summary = validate_report.gpu_report(quick=True, deterministic=False, out=Output(print, print))
    summary["failures"], summary["rows"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from . import build, environment, kvcache_cases, validation
from .device import current_device_id

NO_GPU_VALIDATE = ("No CUDA GPU found: GPU kernels were NOT validated "
                   "(only the NumPy tiled algorithm was checked)")
CASE_WIDTH = 52  # widest id (the varlen window case, "varlen-float16-d64-full-q0,1,203-k0,1,203-g1-w16_4") plus room
CPU_TENSORS = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Output:
    """Where a table's text goes: `line` for its lines, `note` for the lines that must not be
    missed (the CLI sends those to stderr when stdout holds one JSON object)."""

    line: Callable[[str], None]
    note: Callable[[str], None]


def json_number(value: float) -> float | str:
    """JSON has no inf or nan: those become strings."""
    return value if math.isfinite(value) else str(value)


def _run_decode_case(case: kvcache_cases.DecodeCase, deterministic: bool) -> list[Any]:
    """attention_with_kvcache against float64 per sequence, and the caches after the appends
    (no backward, so `deterministic` changes nothing)."""
    host = case.inputs()
    return kvcache_cases.compare_case(case, host, kvcache_cases.run_case(case, host))


def _case_rows(case: validation.Case | validation.VarlenCase | kvcache_cases.DecodeCase, deterministic: bool,
               out: Output, rows: list[dict[str, Any]]) -> int:
    """Runs one GPU case, appends a row per tensor; returns its number of failed tensors."""
    if isinstance(case, kvcache_cases.DecodeCase):
        run = _run_decode_case
    else:
        run = validation.run_varlen_gpu_case if isinstance(case, validation.VarlenCase) else validation.run_gpu_case
    try:
        results = run(case, deterministic=deterministic)
    except Exception as error:  # a crash or a compile error fails this case; the rest still run
        message = f"{type(error).__name__}: {environment.reason(error)}"
        rows.append({"case": case.id, "tensor": None, "ok": False, "exception": message})
        out.line(f"{case.id:<{CASE_WIDTH}} ERROR  {message}")
        return 1
    for r in results:
        rows.append({"case": case.id, "tensor": r.name, "error": json_number(r.error),
                     "baseline_error": json_number(r.baseline_error), "ratio": json_number(r.ratio), "ok": r.ok,
                     **({} if r.ok else {"message": r.message()})})
        out.line(f"{case.id:<{CASE_WIDTH}} {r.name:<6} {r.error:>10.3e} {r.baseline_error:>10.3e} "
                 f"{r.ratio:>7.2f}  {'pass' if r.ok else 'FAIL'}")
        if not r.ok:
            out.line(f"    {r.message()}")  # the worst coordinate and both errors
    return sum(not r.ok for r in results)


def gpu_report(quick: bool, deterministic: bool, out: Output) -> dict[str, Any]:
    """The kernels against the float64 reference (tolerance rule) on the current GPU.

    Returns the JSON summary: gpu, gpu_kernels_validated, device (environment.gpu()), cupy,
    kernel_source_hash, deterministic, ignored_options, cases, failures (failed tensors and
    cases that raised), rows.
    """
    varlen, decode = validation.varlen_matrix(quick), kvcache_cases.decode_matrix(quick)
    cases, rows = [*validation.gpu_matrix(quick), *varlen, *decode], []
    device_id = current_device_id()
    gpu = environment.probe(lambda: environment.gpu(device_id))
    cupy, source = environment.versions()["cupy"], environment.probe(build.source_hash)
    out.line(f"GPU {device_id}: {environment.gpu_line(gpu)}; CuPy {cupy}; kernel source hash {source}; "
             f"{len(cases)} cases ({len(varlen)} varlen, {len(decode)} KV cache); deterministic={deterministic}")
    out.line("pass: error <= 2 x baseline error + floor (error = max|ours - float64 reference|); "
             "varlen cases per sequence (tensor@s<b>), against that sequence alone; KV-cache cases (kv-...) against "
             "each sequence's keys, and kcache / vcache: elements the appends changed wrongly (0 allowed)")
    out.line(f"{'case':<{CASE_WIDTH}} {'tensor':<6} {'error':>10} {'baseline':>10} {'ratio':>7}  result")
    failures = sum(_case_rows(case, deterministic, out, rows) for case in cases)
    out.line(f"{len(cases)} cases, {len(rows)} rows: " + (f"{failures} FAILED" if failures else "all passed")
             + "; GPU kernels validated: yes")
    return {"gpu": True, "gpu_kernels_validated": True, "device": gpu, "cupy": cupy, "kernel_source_hash": source,
            "deterministic": deterministic, "ignored_options": [], "cases": len(cases), "varlen_cases": len(varlen),
            "decode_cases": len(decode), "failures": failures, "rows": rows}


def cpu_report(quick: bool, ignored: list[str], out: Output) -> dict[str, Any]:
    """Without a GPU: the tiled NumPy algorithm against the naive one, in float64; the varlen
    cases per sequence against a block-diagonal masked attention (validation.run_cpu_varlen_case).

    ignored: the options given that apply only to the GPU kernels (each gets a note). Returns
    the JSON summary: gpu, gpu_kernels_validated (False), note, ignored_options, tolerance,
    cases, varlen_cases, failures, rows.
    """
    varlen = validation.cpu_varlen_matrix(quick)
    cases, rows = [*validation.cpu_matrix(quick), *varlen], []
    for option in ignored:
        out.note(f"{option} ignored: it applies to the GPU kernels, and without a GPU none are validated")
    out.line("No CUDA GPU: checking the NumPy tiled algorithm (reference_tiled) against naive attention "
             f"in float64; pass: every max |tiled - naive| <= {validation.CPU_TOLERANCE:g}"
             + ("; varlen cases: tiled and reference.py per sequence against naive attention over the packed "
                "tokens with a block-diagonal mask" if varlen else ""))
    out.line(f"{'case':<{CASE_WIDTH}} " + " ".join(f"{t:>8}" for t in CPU_TENSORS) + "  result")
    failures = 0
    for case in cases:
        run = validation.run_cpu_varlen_case if isinstance(case, validation.VarlenCpuCase) else validation.run_cpu_case
        errors = run(case)
        ok = all(errors[t] <= validation.CPU_TOLERANCE for t in CPU_TENSORS)  # False for nan too
        failures += not ok
        rows.append({"case": case.id, **{t: json_number(errors[t]) for t in CPU_TENSORS}, "ok": ok})
        out.line(f"{case.id:<{CASE_WIDTH}} " + " ".join(f"{errors[t]:>8.1e}" for t in CPU_TENSORS)
                 + f"  {'pass' if ok else 'FAIL'}")
    out.line(f"{len(cases)} cases: " + (f"{failures} FAILED" if failures else "all passed")
             + "; GPU kernels validated: no")
    out.note(NO_GPU_VALIDATE)
    return {"gpu": False, "gpu_kernels_validated": False, "note": NO_GPU_VALIDATE, "ignored_options": ignored,
            "tolerance": validation.CPU_TOLERANCE, "cases": len(cases), "varlen_cases": len(varlen),
            "failures": failures, "rows": rows}
