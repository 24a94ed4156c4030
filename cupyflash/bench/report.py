"""A report's text and files: markdown tables (TFLOP/s per implementation with the cupyflash /
peer ratios, device memory, first calls and NVRTC times) and the JSON + markdown pair that
benchmarks/results/ keeps. A report of kind "varlen" (varlen_run.run_varlen) is written with
varlen_report's text instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .. import build
from ..environment import describe as describe_environment
from .grid import IMPLS, PASSES, RATIO_PEERS
from .varlen_report import format_varlen_report


def default_stem(report: dict[str, Any]) -> str:
    """File stem for a report: the GPU's name and the date, e.g. "bench-nvidia-h100-80gb-hbm3-2026-11-24"
    ("bench-varlen-..." / "bench-decode-..." for a varlen / decode report)."""
    env = report.get("environment", {})
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env.get("gpu") or "cpu").lower()).strip("-")
    prefix = {"varlen": "bench-varlen", "decode": "bench-decode"}.get(report.get("kind"), "bench")
    return f"{prefix}-{gpu}-{str(env.get('date') or 'undated')[:10]}"


# --------------------------------------------------------------------------- tables


def impl_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The impls present in rows: IMPLS' order first (the tables' and plots' columns), then others."""
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in IMPLS if i in present] + [i for i in present if i not in IMPLS]


def _shape_key(row: dict[str, Any]) -> tuple:
    return row["dtype"], row["head_dim"], row["seqlen"], row["causal"]


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _cell(row: dict[str, Any] | None) -> str:
    """TFLOP/s, "✗" appended when the result failed validation, "?" when it was not checked,
    "-" when there is no number (not run, skipped, failed)."""
    if row is None or not isinstance(row.get("tflops"), (int, float)):
        return "-"
    # "reference" marks the naive-cupy row of reports made before results were judged by
    # cupyflash.reference: the other rows were checked against it, so it was not itself.
    mark = "" if row.get("reference") else {False: " ✗", None: " ?", True: ""}[row.get("valid")]
    return _number(row["tflops"]) + mark


def _ratio(ours: dict[str, Any] | None, peer: dict[str, Any] | None) -> str:
    if ours is None or peer is None or not ours.get("tflops") or not peer.get("tflops"):
        return "-"
    if ours.get("valid") is False or peer.get("valid") is False:
        return "✗"
    return f"{ours['tflops'] / peer['tflops']:.2f}"


def format_table(report: dict[str, Any], pass_: str) -> str:
    """Markdown: one row per shape (dtype | D | S | causal | TFLOP/s per impl | cupyflash / peer
    ratios), under a line naming the GPU, date, commit and kernel source hash."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    rows = [r for r in report["rows"] if r["pass"] == pass_]
    impls = impl_order(rows)
    peers = [p for p in RATIO_PEERS if p in impls] if "cupyflash" in impls else []
    index = {(_shape_key(r), r["impl"]): r for r in rows}
    title = {"fwd": "Forward", "bwd": "Backward"}[pass_]
    runs = report.get("settings", {}).get("runs")
    lines = [f"**{title} TFLOP/s** (median of {runs} runs) — {describe_environment(report.get('environment', {}))}",
             "", "| " + " | ".join(["dtype", "D", "S", "causal", *impls, *(f"cupyflash / {p}" for p in peers)]) + " |",
             "|" + "---|" * (4 + len(impls) + len(peers))]
    for key in dict.fromkeys(_shape_key(r) for r in rows):
        cells = [key[0], str(key[1]), str(key[2]), "1" if key[3] else "0"]
        cells += [_cell(index.get((key, i))) for i in impls]
        cells += [_ratio(index.get((key, "cupyflash")), index.get((key, p))) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no results) |")
    lines += ["", "✗ failed validation (timed anyway) · ? not validated · - not run, skipped or failed"]
    return "\n".join(lines)


def format_memory_table(report: dict[str, Any]) -> str:
    """Markdown: peak extra MiB of one call (cupyflash and naive-cupy), its outputs, and the
    difference (scratch: O(seqlen) for cupyflash, O(seqlen²) for naive-cupy)."""
    lines = ["**Device memory of one call** (MiB allocated through CuPy at the peak, outputs included)", "",
             "| impl | pass | dtype | D | S | causal | peak extra | outputs | scratch |", "|" + "---|" * 9]
    for r in report["rows"]:
        if isinstance(r.get("peak_extra_mb"), (int, float)):
            lines.append(f"| {r['impl']} | {r['pass']} | {r['dtype']} | {r['head_dim']} | {r['seqlen']} | "
                         f"{int(r['causal'])} | {r['peak_extra_mb']:.1f} | {r['output_mb']:.1f} | "
                         f"{r['peak_extra_mb'] - r['output_mb']:.1f} |")
    return "\n".join(lines)


def first_calls(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The first measured call per (impl, pass, dtype, head_dim, causal): wall ms and new cubins."""
    firsts: dict[tuple, dict[str, Any]] = {}
    for r in report["rows"]:
        if "first_call_ms" in r:
            key = (r["impl"], r["pass"], r["dtype"], r["head_dim"], r["causal"])
            firsts.setdefault(key, {"impl": r["impl"], "pass": r["pass"], "dtype": r["dtype"],
                                    "head_dim": r["head_dim"], "causal": r["causal"], "seqlen": r["seqlen"],
                                    "first_call_ms": r["first_call_ms"], "new_cubins": r.get("new_cubins")})
    return list(firsts.values())


def format_compile_table(report: dict[str, Any]) -> str:
    """Markdown: first-call wall times seen by run(), and NVRTC times when measured."""
    lines = ["**First calls** (wall ms, compile and module load included; new cubins = NVRTC runs)", "",
             "| impl | pass | dtype | D | causal | S | first call ms | new cubins |", "|" + "---|" * 8]
    for f in first_calls(report):
        lines.append(f"| {f['impl']} | {f['pass']} | {f['dtype']} | {f['head_dim']} | {int(f['causal'])} | "
                     f"{f['seqlen']} | {f['first_call_ms']:.0f} | {f['new_cubins']} |")
    if report.get("compile_times"):
        lines += ["", "**NVRTC compile times** (default configs, no disk cache; (shared) = program already "
                  "compiled in this process)", "",
                  "| dtype | D | pass | kernel | arch | seconds | registers | spill bytes |", "|" + "---|" * 8]
        lines += [f"| {c['dtype']} | {c['head_dim']} | {c['pass']} | {c['entry']} | {c['arch']} | "
                  f"{'(shared)' if c.get('memoized') else format(c['seconds'], '.2f')} | {c['registers']} | "
                  f"{c['spill_bytes']} |" for c in report["compile_times"]]
        lines += [f"\n{c['entry']} ({c['dtype']}, D {c['head_dim']}) failed: {c['failure']}"
                  for c in report["compile_times"] if c.get("failure")]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Every table of a report, as one markdown document."""
    if report.get("kind") == "varlen":
        return format_varlen_report(report)
    passes = [p for p in PASSES if any(r["pass"] == p for r in report["rows"])]
    parts = [format_table(report, p) for p in passes]
    invalid = [r for r in report["rows"] if r.get("valid") is False]
    failed = [r for r in report["rows"] if r.get("failure")]
    parts.append(f"{len(report['rows'])} results: {len(invalid)} failed validation, {len(failed)} raised.")
    parts += [format_memory_table(report), format_compile_table(report)]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- files


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NumPy scalars unwrapped, tuples as lists, non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": strict JSON has no such numbers
    if isinstance(value, Path):
        return str(value)
    return value


def save(report: dict[str, Any], directory: str | Path, stem: str,
         formatter: Callable[[dict[str, Any]], str] | None = None) -> list[Path]:
    """Write <directory>/<stem>.json (the whole report) and <stem>.md (formatter(report),
    format_report by default), each atomically (a temporary file renamed into place). Returns
    both paths."""
    directory = Path(directory)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    text = json.dumps(_jsonable(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    build.write_atomic(json_path, text.encode())
    build.write_atomic(md_path, (formatter or format_report)(report).encode())
    return [json_path, md_path]


def load(path: str | Path) -> dict[str, Any]:
    """A report written by save()."""
    return json.loads(Path(path).read_text())
