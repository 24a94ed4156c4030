"""The decode report's summary and text: per cell the TB/s of every impl, cupyflash's share of
the copy bandwidth, its speed over torch-cudnn's and its paged layouts over its contiguous
cache, each against the issue's bar (bench.decode); the markdown, and the JSON + markdown files
of a report of kind "decode".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..environment import describe as describe_environment
from .decode import (BANDWIDTH_BAR, BANDWIDTH_MIN_TOKENS, CUDNN_BAR, CUDNN_BAR_MANY, MANY_QUERY_TOKENS, OURS,
                     PAGED_BAR, PAGED_MIN_PAGE, cudnn_bar, has_copy_bar, page_size_of)
from .report import default_stem, save
from .varlen_report import detail_lines

CELL_KEYS = ("id", "dtype", "head_dim", "heads_q", "heads_kv", "seqlen_q", "batch", "cache", "tokens", "kv_bytes")


def _rate(row: dict[str, Any] | None) -> float | None:
    return row["tbps"] if row is not None and isinstance(row.get("tbps"), (int, float)) else None


def _ratio(ours: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
    """ours' TB/s / other's (the inverse ratio of their times), None unless both have a number."""
    a, b = _rate(ours), _rate(other)
    return a / b if a is not None and b else None


def _invalid(*rows: dict[str, Any] | None) -> bool:
    return any(r is not None and r.get("valid") is False for r in rows)


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """rows by cell id, in the order they first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    return groups


def _verdicts(ours: dict[str, Any] | None, cudnn: dict[str, Any] | None, paged: list[dict[str, Any]],
              first: dict[str, Any]) -> dict[str, bool | None]:
    """The three bars of one cell: True / False, or None where a bar does not apply or lacks a
    number. A cupyflash result that failed validation never meets a bar; a cuDNN result that did
    is no yardstick (None)."""
    copy = ours.get("copy_fraction") if ours is not None else None
    meets_copy = None if not has_copy_bar(first["seqlen_q"], first["tokens"]) or copy is None else (
        False if _invalid(ours) else copy >= BANDWIDTH_BAR)
    ratio = _ratio(ours, cudnn)
    meets_cudnn = None if ratio is None or _invalid(cudnn) else (
        False if _invalid(ours) else ratio >= cudnn_bar(first["seqlen_q"]))
    judged = [r for r in paged if r["page_size"] >= PAGED_MIN_PAGE]
    ratios = [_ratio(r, ours) for r in judged]
    meets_paged = False if _invalid(ours, *judged) else (
        all(x >= PAGED_BAR for x in ratios if x is not None) if any(x is not None for x in ratios) else None)
    return {"copy": meets_copy, "cudnn": meets_cudnn, "paged": meets_paged if judged else None}


def summarize_decode(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: its fields (CELL_KEYS), tbps and valid per impl, ms and copy_fraction of
    cupyflash, cudnn_ratio and flash_ratio (cupyflash TB/s / the peer's; None without both),
    cudnn_bar (what the issue asks of cudnn_ratio here), paged_ratio ({"page size": paged TB/s
    / contiguous TB/s}), and meets: {"copy", "cudnn", "paged"} each True, False or None (see
    _verdicts)."""
    summary = []
    for group in _groups(rows).values():
        by_impl = {r["impl"]: r for r in group}
        first, ours = group[0], by_impl.get(OURS)
        cudnn, flash = by_impl.get("torch-cudnn"), by_impl.get("torch-flash")
        paged = sorted((r for r in group if page_size_of(r["impl"]) is not None), key=lambda r: r["page_size"])
        entry = {key: first[key] for key in CELL_KEYS}
        entry.update(tbps={r["impl"]: r.get("tbps") for r in group}, valid={r["impl"]: r.get("valid") for r in group},
                     ms=ours.get("ms") if ours else None, copy_fraction=ours.get("copy_fraction") if ours else None,
                     cudnn_ratio=_ratio(ours, cudnn), flash_ratio=_ratio(ours, flash),
                     cudnn_bar=cudnn_bar(first["seqlen_q"]),
                     paged_ratio={str(r["page_size"]): _ratio(r, ours) for r in paged},
                     meets=_verdicts(ours, cudnn, paged, first))
        summary.append(entry)
    return summary


def bar_counts(summary: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per bar: (cells that miss it, cells judged by it)."""
    return {bar: (sum(s["meets"][bar] is False for s in summary), sum(s["meets"][bar] is not None for s in summary))
            for bar in ("copy", "cudnn", "paged")}


# --------------------------------------------------------------------------- text


def impl_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """cupyflash, its paged layouts by page size, then the peers in the order they appear."""
    present = list(dict.fromkeys(r["impl"] for r in rows))
    paged = sorted((i for i in present if page_size_of(i) is not None), key=page_size_of)
    return ([OURS] if OURS in present else []) + paged + [i for i in present if i != OURS and i not in paged]


def _tokens(count: int) -> str:
    return f"{count // 1024}k" if count >= 1024 and count % 1024 == 0 else str(count)


def _cell(row: dict[str, Any] | None) -> str:
    """TB/s, " ✗" when the result failed validation, " ?" when it was not checked, "-" without a number."""
    rate = _rate(row)
    if rate is None:
        return "-"
    return f"{rate:.2f}" + {False: " ✗", None: " ?", True: ""}[row.get("valid")]


def _ratio_cell(ratio: float | None, *rows: dict[str, Any] | None) -> str:
    if ratio is None:
        return "-"
    return "✗" if _invalid(*rows) else f"{ratio:.2f}"


def _microseconds(ms: float | None) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return f"{ms * 1e3:.1f}" if ms < 0.1 else f"{ms * 1e3:.0f}"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def _paged_cell(summary: dict[str, Any]) -> str:
    parts = [f"{page}: {ratio:.2f}" for page, ratio in summary["paged_ratio"].items() if ratio is not None]
    return " · ".join(parts) or "-"


def _peer_ways(rows: list[dict[str, Any]]) -> list[str]:
    """One line per torch peer: the GQA and mask modes its rows ran with, and how many rows each."""
    lines = []
    for impl in dict.fromkeys(r["impl"] for r in rows if "gqa" in r):
        ways: dict[str, int] = {}
        for r in rows:
            if r["impl"] == impl and "gqa" in r:
                way = f"{r['gqa']}; {r['mask']}"
                ways[way] = ways.get(way, 0) + 1
        lines.append(f"{impl}: " + " | ".join(f"{way} ({count} cell{'s' if count > 1 else ''})"
                                              for way, count in ways.items()))
    return lines


def format_decode_table(report: dict[str, Any]) -> str:
    """Markdown: one row per cell with the TB/s of every impl, cupyflash's time (µs), its share of the
    copy bandwidth, its speed over torch-cudnn against the bar, paged / contiguous, and the
    three bars met or not, under a line naming the GPU, date, commit and source hash."""
    rows, summary = report["rows"], report.get("summary") or summarize_decode(report["rows"])
    impls = impl_order(rows)
    index = {(r["id"], r["impl"]): r for r in rows}
    settings, copy = report.get("settings", {}), report.get("copy") or {}
    copy_text = f"{copy['tbps']:.2f} TB/s" if isinstance(copy.get("tbps"), (int, float)) else "not measured"
    header = ["dtype", "D", "Sq", "B", "cache", "Hq/Hkv", *impls, "cupyflash µs", "of copy", "/ cuDNN", "needed",
              "paged / contiguous", "copy bar", "cuDNN bar", "paged bar"]
    lines = [f"**Decode TB/s** (K and V bytes read once over the median of {settings.get('runs')} runs; copy "
             f"bandwidth {copy_text}, read + written) — {describe_environment(report.get('environment', {}))}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        ours, cudnn = index.get((s["id"], OURS)), index.get((s["id"], "torch-cudnn"))
        cells = [s["dtype"], str(s["head_dim"]), str(s["seqlen_q"]), str(s["batch"]), _tokens(s["cache"]),
                 f"{s['heads_q']}/{s['heads_kv']}", *(_cell(index.get((s["id"], i))) for i in impls),
                 _microseconds(s.get("ms")),
                 f"{s['copy_fraction']:.0%}" if isinstance(s.get("copy_fraction"), (int, float)) else "-",
                 _ratio_cell(s["cudnn_ratio"], ours, cudnn), f"{s['cudnn_bar']:.1f}", _paged_cell(s),
                 *(_met(s["meets"][bar]) for bar in ("copy", "cudnn", "paged"))]
        lines.append("| " + " | ".join(cells) + " |")
    if not summary:
        lines.append("| (no results) |")
    lines += ["", f"bars: one query token on >= {_tokens(BANDWIDTH_MIN_TOKENS)} cached tokens (batch x cache): "
                  f"cupyflash >= {BANDWIDTH_BAR:.2f} x the copy bandwidth; cupyflash >= {CUDNN_BAR:.1f}x torch-cudnn "
                  f"in every cell, >= {CUDNN_BAR_MANY:.1f}x at {' and '.join(map(str, MANY_QUERY_TOKENS))} query "
                  f"tokens; paged (page >= {PAGED_MIN_PAGE}) >= {PAGED_BAR:.2f} x contiguous",
              f"timing: {settings.get('timing', '-')}", f"peers: {settings.get('peer_note', 'none')}",
              *(f"- {line}" for line in _peer_ways(rows)),
              "✗ failed validation (timed anyway) · ? not validated · - not run, skipped or failed"]
    return "\n".join(lines)


def format_decode_report(report: dict[str, Any]) -> str:
    """The whole decode report as one markdown document (what save_decode writes)."""
    rows = report["rows"]
    summary = report.get("summary") or summarize_decode(rows)
    invalid = sum(r.get("valid") is False for r in rows)
    failed = sum(bool(r.get("failure")) for r in rows)
    skipped = sum(str(r.get("note", "")).startswith("skipped: memory") for r in rows)
    missed = ", ".join(f"{bar} {miss} of {judged}" for bar, (miss, judged) in bar_counts(summary).items())
    parts = [format_decode_table(report),
             f"{len(rows)} results: {invalid} failed validation, {failed} raised, {skipped} skipped for memory; "
             f"bars missed: {missed}.",
             "\n".join(["**Details**", "", *detail_lines(rows, lambda r: f"{r['id']} {r['impl']}",
                                                          notes=True)])]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- files


def decode_stem(report: dict[str, Any]) -> str:
    """File stem of a decode report, "bench-decode-<gpu>-<date>" (report.default_stem)."""
    return default_stem({**report, "kind": "decode"})


def save_decode(report: dict[str, Any], directory: str | Path, stem: str | None = None) -> list[Path]:
    """report.save with format_decode_report for the .md; stem defaults to decode_stem."""
    return save(report, directory, stem or decode_stem(report), format_decode_report)
