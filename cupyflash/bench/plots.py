"""TFLOP/s against sequence length, one panel per (pass, head_dim), one line per implementation.
matplotlib is imported only when a plot is drawn (the `plot` extra), never with cupyflash.bench.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from .grid import IMPLS, PASSES
from .report import impl_order


def plot_series(report: dict[str, Any], dtype: str = "float16",
                causal: bool = False) -> dict[tuple[str, int], dict[str, list[tuple[int, float]]]]:
    """{(pass, head_dim): {impl: [(seqlen, TFLOP/s), ...] sorted by seqlen}} for one dtype and
    causality; results that failed validation or have no time are left out."""
    series: dict[tuple[str, int], dict[str, list[tuple[int, float]]]] = {}
    for r in report["rows"]:
        if r["dtype"] != dtype or bool(r["causal"]) != causal or r.get("valid") is False:
            continue
        if not isinstance(r.get("tflops"), (int, float)):
            continue
        series.setdefault((r["pass"], r["head_dim"]), {}).setdefault(r["impl"], []).append((r["seqlen"], r["tflops"]))
    for by_impl in series.values():
        for points in by_impl.values():
            points.sort()
    return series


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def _plot_choice(report: dict[str, Any], dtype: str | None, causal: bool | None) -> tuple[str, bool]:
    """The (dtype, causal) to plot: as given, else float16 and non-causal when present."""
    combos = list(dict.fromkeys((r["dtype"], bool(r["causal"])) for r in report["rows"]))
    combos = [c for c in combos if dtype in (None, c[0]) and causal in (None, c[1])]
    if not combos:
        return (dtype or "float16", bool(causal))
    return min(combos, key=lambda c: (c[0] != "float16", c[1]))


def plot(report: dict[str, Any], path: str | Path, *, dtype: str | None = None, causal: bool | None = None) -> Path:
    """PNG of TFLOP/s against seqlen (log2 axis) per implementation, one panel per (pass,
    head_dim), for one dtype and causality (default: float16 and non-causal if the report has
    them, else what it has). Needs matplotlib (imported here, not when bench is imported)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("cupyflash.bench.plot needs matplotlib: pip install 'cupyflash[plot]'") from exc
    dtype, causal = _plot_choice(report, dtype, causal)
    series = plot_series(report, dtype, causal)
    if not series:
        raise ValueError(f"no valid {dtype} {'causal' if causal else 'non-causal'} results to plot")
    passes = [p for p in PASSES if any(key[0] == p for key in series)]
    dims = sorted({key[1] for key in series})
    figure = Figure(figsize=(4.2 * len(dims), 3.4 * len(passes)), layout="constrained")
    axes = figure.subplots(len(passes), len(dims), squeeze=False)
    for (i, pass_), (j, head_dim) in itertools.product(enumerate(passes), enumerate(dims)):
        ax = axes[i][j]
        for impl in impl_order({"impl": name} for name in series.get((pass_, head_dim), {})):
            xs, ys = zip(*series[(pass_, head_dim)][impl])
            color = f"C{IMPLS.index(impl) % 10}" if impl in IMPLS else None  # one colour per impl in every panel
            ax.plot(xs, ys, marker="o", label=impl, color=color)
        seqlens = sorted({x for points in series.get((pass_, head_dim), {}).values() for x, _ in points})
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(seqlens, [_seqlen_label(s) for s in seqlens])
        ax.set(title=f"{pass_}, head_dim {head_dim}", xlabel="seqlen", ylabel="TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _legend(figure, axes)
    return save_figure(figure, report, f"{dtype} · {'causal' if causal else 'non-causal'}", path)


def save_figure(figure: Any, report: dict[str, Any], what: str, path: Path) -> Path:
    """Title the figure with the GPU, `what`, the commit and the kernel source hash, and write it
    as a PNG atomically (a temporary file renamed into place)."""
    env = report.get("environment", {})
    figure.suptitle(f"{env.get('gpu')} · {what} · commit {str(env.get('git_commit'))[:12]} · "
                    f"kernels {env.get('source_hash')}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path


def _legend(figure: Any, axes: Any) -> None:
    """One legend for every panel, below them (inside the first panel on matplotlib < 3.7)."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = impl_order({"impl": label} for label in handles)
    try:
        figure.legend([handles[x] for x in labels], labels, loc="outside lower center", ncols=len(labels),
                      fontsize=8)
    except (TypeError, ValueError):  # "outside" placement is matplotlib 3.7+
        axes.flat[0].legend([handles[x] for x in labels], labels, fontsize=7)


def save_plots(report: dict[str, Any], directory: str | Path, stem: str) -> list[Path]:
    """One plot() per (dtype, causal) present: <directory>/<stem>-<dtype>-<causal|full>.png."""
    combos = dict.fromkeys((r["dtype"], bool(r["causal"])) for r in report["rows"])
    paths = []
    for dtype, causal in combos:
        if plot_series(report, dtype, causal):
            name = f"{stem}-{dtype}-{'causal' if causal else 'full'}.png"
            paths.append(plot(report, Path(directory) / name, dtype=dtype, causal=causal))
    return paths
