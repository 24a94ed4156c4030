"""The variable-length report's summary and text: per (batch, pass) the TFLOP/s of every impl,
the varlen / dense ratio against the issue's bar, and the markdown that report.save writes
for a report of kind "varlen".
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..environment import describe as describe_environment
from .varlen import EQUAL_BAR, MIXED_BAR

OURS = ("cupyflash-varlen", "cupyflash-dense")


def _ratio(ours: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
    """ours' TFLOP/s / other's, None unless both have a number."""
    if ours is None or other is None or not ours.get("tflops") or not other.get("tflops"):
        return None
    return ours["tflops"] / other["tflops"]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """rows by (batch id, pass), in the order they first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["id"], row["pass"]), []).append(row)
    return groups


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, pass): the batch's fields, dense ("BxS" of the dense call), tflops and valid
    per impl, ratio (cupyflash-varlen / cupyflash-dense TFLOP/s; None without both numbers),
    bar, meets (None without a ratio; False when the varlen result failed validation; else
    ratio >= bar), and for the torch peer: peer and peer_ratio (varlen / peer)."""
    summary = []
    for (batch_id, pass_), group in _groups(rows).items():
        by_impl = {r["impl"]: r for r in group}
        first, varlen = group[0], by_impl.get("cupyflash-varlen")
        ratio = _ratio(varlen, by_impl.get("cupyflash-dense"))
        meets = None if ratio is None else (False if varlen.get("valid") is False else ratio >= first["bar"])
        entry = {key: first[key] for key in ("id", "kind", "pass", "dtype", "head_dim", "heads", "causal", "spec",
                                             "sequences", "tokens", "bar")}
        entry.update(dense=f"{first['dense_batch']}x{first['dense_seqlen']}",
                     tflops={r["impl"]: r.get("tflops") for r in group},
                     valid={r["impl"]: r.get("valid") for r in group}, ratio=ratio, meets=meets)
        peer = next((r for r in group if r["impl"] not in OURS), None)
        if peer is not None:
            entry.update(peer=peer["impl"], peer_ratio=_ratio(varlen, peer))
        summary.append(entry)
    return summary


# --------------------------------------------------------------------------- text


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _cell(row: dict[str, Any] | None) -> str:
    """TFLOP/s, " ✗" when the result failed validation, " ?" when it was not checked, "-" without a number."""
    if row is None or not isinstance(row.get("tflops"), (int, float)):
        return "-"
    return _number(row["tflops"]) + {False: " ✗", None: " ?", True: ""}[row.get("valid")]


def _ratio_cell(ratio: float | None, *rows: dict[str, Any] | None) -> str:
    if ratio is None:
        return "-"
    return "✗" if any(r is not None and r.get("valid") is False for r in rows) else f"{ratio:.2f}"


def impl_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Our two impls first, then the peers in the order they appear."""
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in OURS if i in present] + [i for i in present if i not in OURS]


def format_varlen_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (batch, pass) with the TFLOP/s of every impl, varlen / dense against
    the bar, and varlen / peer, under a line naming the GPU, date, commit and source hash."""
    rows, summary = report["rows"], report.get("summary") or summarize(report["rows"])
    impls = impl_order(rows)
    peers = [i for i in impls if i not in OURS]
    index = {(r["id"], r["pass"], r["impl"]): r for r in rows}
    runs = report.get("settings", {}).get("runs")
    header = ["batch", "dtype", "D", "H", "causal", "pass", "dense BxS", *impls, "varlen / dense", "bar", "met",
              *(f"varlen / {p}" for p in peers)]
    lines = [f"**Variable-length TFLOP/s** (median of {runs} runs, varlen and dense in alternation; "
             "FLOPs of the real tokens only) — "
             f"{describe_environment(report.get('environment', {}))}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        row_of = {i: index.get((s["id"], s["pass"], i)) for i in impls}
        met = {True: "yes", False: "NO", None: "-"}[s["meets"]]
        cells = [f"{s['kind']} {s['spec']}", s["dtype"], str(s["head_dim"]), str(s["heads"]),
                 "1" if s["causal"] else "0", s["pass"], s["dense"], *(_cell(row_of[i]) for i in impls),
                 _ratio_cell(s["ratio"], row_of.get("cupyflash-varlen"), row_of.get("cupyflash-dense")),
                 f"{s['bar']:.2f}", met]
        cells += [_ratio_cell(_ratio(row_of.get("cupyflash-varlen"), row_of[p]), row_of.get("cupyflash-varlen"),
                              row_of[p]) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    if not summary:
        lines.append("| (no results) |")
    lines += ["", f"bars: equal lengths >= {EQUAL_BAR:.2f} x the dense call on the same tokens, mixed lengths "
                  f">= {MIXED_BAR:.2f} x the dense call at their mean length (same total tokens); "
                  f"peer: {report.get('settings', {}).get('peer_note', 'none')}",
              "✗ failed validation (timed anyway) · ? not validated · - not run, skipped or failed"]
    return "\n".join(lines)


def detail_lines(rows: Iterable[dict[str, Any]], head: Callable[[dict[str, Any]], str], *,
                 notes: bool = False) -> list[str]:
    """Failures, mismatches, (with `notes`) notes and first calls, one line each, each after
    "- " + head(row): the details of the varlen and the decode reports."""
    lines = []
    for r in rows:
        name = f"- {head(r)}"
        if r.get("failure"):
            lines.append(f"{name} raised: {r['failure']}")
        lines += [f"{name}: {m}" for m in r.get("mismatches", [])]
        if notes and r.get("note"):
            lines.append(f"{name}: {r['note']}")
        if "first_call_ms" in r:
            lines.append(f"{name}: first call {r['first_call_ms']:.0f} ms, {r.get('new_cubins')} new cubins, "
                         f"peak extra {r.get('peak_extra_mb', 0):.1f} MiB (outputs {r.get('output_mb', 0):.1f})")
    return lines


def format_varlen_report(report: dict[str, Any]) -> str:
    """The whole varlen report as one markdown document (what report.save writes)."""
    rows = report["rows"]
    invalid = sum(r.get("valid") is False for r in rows)
    failed = sum(bool(r.get("failure")) for r in rows)
    summary = report.get("summary") or summarize(rows)
    missed = [f"{s['kind']} {s['spec']} {s['dtype']} {s['pass']}" for s in summary if s["meets"] is False]
    parts = [format_varlen_table(report),
             f"{len(rows)} results: {invalid} failed validation, {failed} raised; bar missed by "
             f"{len(missed)} of {sum(s['meets'] is not None for s in summary)}" + (f" ({', '.join(missed)})" if missed
                                                                                 else "") + ".",
             "\n".join(["**Details**", "", *detail_lines(rows, lambda r: f"{r['id']} {r['impl']} {r['pass']}")])]
    return "\n\n".join(parts) + "\n"
