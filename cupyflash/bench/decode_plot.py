"""TB/s of a decode report against the cached tokens of a batch (batch x cache), one panel per
(heads, query tokens), one marker per implementation, the copy bandwidth and the issue's share
of it drawn across. matplotlib is imported only when a plot is drawn (the `plot` extra).

Points, not lines: different (batch, cache) pairs hold the same number of tokens (16 x 128k and
64 x 32k), so a line through them would zigzag.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from .decode import BANDWIDTH_BAR
from .decode_report import impl_order
from .plots import _legend, save_figure

MARKERS = "os^vDPX*<>"
Series = dict[tuple[str, int], dict[str, list[tuple[int, float]]]]


def _choice(report: dict[str, Any], dtype: str | None, head_dim: int | None) -> tuple[str | None, int | None]:
    """The (dtype, head_dim) to draw: as given, else the first row's."""
    first = report["rows"][0] if report["rows"] else {}
    return dtype or first.get("dtype"), head_dim or first.get("head_dim")


def plot_decode_series(report: dict[str, Any], dtype: str | None = None, head_dim: int | None = None) -> Series:
    """{("Hq/Hkv", seqlen_q): {impl: [(tokens, TB/s), ...] sorted}} for one dtype and head dim
    (default: the first row's); results that failed validation or have no time are left out."""
    dtype, head_dim = _choice(report, dtype, head_dim)
    series: Series = {}
    for r in report["rows"]:
        if r["dtype"] != dtype or r["head_dim"] != head_dim or r.get("valid") is False:
            continue
        if not isinstance(r.get("tbps"), (int, float)):
            continue
        key = (f"{r['heads_q']}/{r['heads_kv']}", r["seqlen_q"])
        series.setdefault(key, {}).setdefault(r["impl"], []).append((r["tokens"], r["tbps"]))
    for by_impl in series.values():
        for points in by_impl.values():
            points.sort()
    return series


def _panel(ax: Any, by_impl: dict[str, list[tuple[int, float]]], impls: list[str], copy: float | None) -> None:
    """One panel: each impl's points in its own marker and colour, the copy bandwidth and the bar's share of it."""
    for impl, points in by_impl.items():
        xs, ys = zip(*points)
        n = impls.index(impl)
        ax.plot(xs, ys, linestyle="none", marker=MARKERS[n % len(MARKERS)], color=f"C{n % 10}", label=impl)
    if isinstance(copy, (int, float)):
        ax.axhline(copy, color="0.3", linewidth=0.8, label="copy bandwidth")
        ax.axhline(BANDWIDTH_BAR * copy, color="0.3", linewidth=0.8, linestyle=":", label=f"{BANDWIDTH_BAR:.2f} x copy")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot_decode(report: dict[str, Any], path: str | Path, *, dtype: str | None = None,
                head_dim: int | None = None) -> Path:
    """PNG of plot_decode_series: a row of panels per heads layout, a column per query-token
    count, TB/s against batch x cache tokens (log2 axis). Needs matplotlib (imported here)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("cupyflash.bench.plot_decode needs matplotlib: pip install 'cupyflash[plot]'") from exc
    dtype, head_dim = _choice(report, dtype, head_dim)
    series = plot_decode_series(report, dtype, head_dim)
    if not series:
        raise ValueError(f"no valid {dtype} head_dim {head_dim} decode results to plot")
    heads = list(dict.fromkeys(key[0] for key in series))
    tokens = sorted({key[1] for key in series})
    impls = impl_order({"impl": impl} for by_impl in series.values() for impl in by_impl)
    figure = Figure(figsize=(3.6 * len(tokens), 3.2 * len(heads)), layout="constrained")
    axes = figure.subplots(len(heads), len(tokens), squeeze=False)
    for (i, layout), (j, seqlen_q) in itertools.product(enumerate(heads), enumerate(tokens)):
        _panel(axes[i][j], series.get((layout, seqlen_q), {}), impls, (report.get("copy") or {}).get("tbps"))
        axes[i][j].set(title=f"heads {layout}, {seqlen_q} query tokens", xlabel="batch x cache tokens",
                       ylabel="TB/s")
    _legend(figure, axes)
    return save_figure(figure, report, f"{dtype} · head_dim {head_dim}", path)
