"""The frontier's pictures: a PNG (matplotlib) and an interactive HTML page (plotly, self-contained) of accuracy
against cost, each method its own colour and marker, each point's 95% interval as an error bar, the no-pruning point
and the paper's schedule marked, each frontier drawn as a step line, its points ringed: solid where on it beyond
noise, dashed where within noise of a cheaper point (:func:`pipelines.frontier.pareto.noise_status`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.eval.metrics import PREFILL_MS, TFLOPS
from pipelines.frontier.pareto import FRONTIER_NOISY, Front, Point, interval_text, layers_text, ratios_text

METHODS = ("none", "lvpruning", "random", "fastv")  # fixed colours and markers; other methods come after
# 10 colours and 11 markers: method i gets colour i % 10 and marker i % 11, a pair of its own for 110 methods
_COLOURS = ("#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_COLOURS += ("#bcbd22",)
_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "h", "<", "p")
_PLOTLY_SYMBOLS = {"*": "star", "o": "circle", "s": "square", "^": "triangle-up", "D": "diamond"}
_PLOTLY_SYMBOLS |= {"v": "triangle-down", "P": "cross", "X": "x", "h": "hexagon", "<": "triangle-left"}
_PLOTLY_SYMBOLS |= {"p": "pentagon"}
_LABELS = {  # annotation: text, offset in points (up is +), alignment; the baseline is the costliest point
    "none": ("no pruning", (-14, 14), "right"),
    "paper": ("paper's schedule 0.5-0.3-0.1", (14, -22), "left"),
}
_COST_LABELS = {TFLOPS: "TFLOPs (prefill, 1 image + 30 text tokens)", PREFILL_MS: "prefill latency (ms, median)"}


def method_styles(points: Sequence[Point]) -> dict[str, tuple[str, str]]:
    """Method -> (colour, matplotlib marker): fixed for the known methods, then the others by name."""
    extra = sorted({p.method for p in points} - set(METHODS))
    methods = [*METHODS, *extra]
    return {m: (_COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}


def plot_panels(points: Sequence[Point], fronts: Sequence[Front]) -> list[Front]:
    """The fronts worth a panel: the mean against TFLOPs, each benchmark's if there are several, the latency one if
    any point has a latency."""
    main, *rest = fronts
    per_bench = [f for f in rest if f.cost == TFLOPS]
    latency = [f for f in rest if f.cost != TFLOPS and f.excluded < len(points)]
    return [main, *(per_bench if len(per_bench) > 1 else []), *latency]


@dataclass(frozen=True)
class _Panel:
    """What both plots draw of one front: coordinates, points per method, the frontier by cost, annotations."""

    x: np.ndarray  # (n,) cost
    y: np.ndarray  # (n,) accuracy
    err: np.ndarray  # (2, n) below and above y: the 95% interval (0 where none was logged)
    by_method: dict[str, list[int]]  # method -> indices of its plottable points
    on: list[int]  # frontier indices by cost
    noisy: list[int]  # the frontier's points within noise of a cheaper point
    labels: list[tuple[int, str]]  # (index, key of _LABELS): the baseline and the paper's schedule

    @classmethod
    def of(cls, points: Sequence[Point], fr: Front, methods: Sequence[str]) -> _Panel:
        x, y = (np.array([p.value(m) for p in points], dtype=float) for m in (fr.cost, fr.accuracy))
        low, high = np.array([p.interval(fr.accuracy) for p in points], dtype=float).reshape(-1, 2).T
        err = np.nan_to_num(np.stack([y - low, high - y]))  # (2, n)
        ok = [i for i in range(len(points)) if not (np.isnan(x[i]) or np.isnan(y[i]))]
        by_method = {m: [i for i in ok if points[i].method == m] for m in methods}
        on = sorted(np.flatnonzero(fr.mask).tolist(), key=lambda i: x[i])
        labels = [(i, "none") for i in ok if points[i].method == "none"]
        labels += [(i, "paper") for i in ok if points[i].is_paper_schedule]
        noisy = [i for i in on if fr.status[i] == FRONTIER_NOISY]
        return cls(x, y, err, {m: idx for m, idx in by_method.items() if idx}, on, noisy, labels)


def _title(fr: Front, n: int) -> str:
    excluded = f", {fr.excluded} excluded" if fr.excluded else ""
    on = f"{int(fr.mask.sum())} of {n} on the frontier ({fr.beyond_doubt} beyond noise)"
    return f"{fr.accuracy} vs {fr.cost}: {on}{excluded}"


def plot_png(points: Sequence[Point], fronts: Sequence[Front], path: str | Path) -> None:
    """Scatter per panel (methods by colour and marker), the frontier as a step line, the baseline and the paper's
    schedule annotated. A bare ``Figure``: no pyplot, so no global backend and no GUI."""
    from matplotlib.figure import Figure

    panels, styles = plot_panels(points, fronts), method_styles(points)
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(7 * cols, 5 * rows), layout="constrained")
    for k, fr in enumerate(panels):
        ax, pa = fig.add_subplot(rows, cols, k + 1), _Panel.of(points, fr, list(styles))
        for method, idx in pa.by_method.items():
            colour, marker = styles[method]
            ax.errorbar(pa.x[idx], pa.y[idx], yerr=pa.err[:, idx], fmt="none", ecolor=colour, elinewidth=0.8, alpha=0.5)
            ax.scatter(pa.x[idx], pa.y[idx], c=colour, marker=marker, s=140 if marker == "*" else 50, label=method)
        if pa.on:
            ax.step(pa.x[pa.on], pa.y[pa.on], where="post", color="black", lw=1.2, alpha=0.6, label="Pareto frontier")
            sure = [i for i in pa.on if i not in pa.noisy]
            ring = {"s": 160, "facecolors": "none", "lw": 1, "zorder": 4}
            ax.scatter(pa.x[sure], pa.y[sure], edgecolors="black", label="beyond noise", **ring)
            if pa.noisy:
                ax.scatter(
                    pa.x[pa.noisy], pa.y[pa.noisy], edgecolors="dimgray", linestyles="--", label="within noise", **ring
                )
        for i, key in pa.labels:
            text, offset, ha = _LABELS[key]
            ax.annotate(
                text, (pa.x[i], pa.y[i]), xytext=offset, textcoords="offset points", ha=ha, fontsize=9,
                arrowprops={"arrowstyle": "->", "lw": 0.8},
            )  # fmt: skip
        ax.set(title=_title(fr, len(points)), xlabel=_COST_LABELS.get(fr.cost, fr.cost), ylabel=f"{fr.accuracy} (%)")
        ax.title.set_fontsize(10)
        ax.margins(y=0.12)  # room for the annotations
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)


def _hover(p: Point, fr: Front, i: int) -> list[str]:
    return [
        p.method,
        p.run_name,
        layers_text(p.layers),
        ratios_text(p.train_ratios),
        ratios_text(p.infer_ratios),
        p.run_id,
        interval_text(p.interval(fr.accuracy)),
        fr.status[i],
    ]


def plot_html(points: Sequence[Point], fronts: Sequence[Front], path: str | Path) -> None:
    """The PNG's panels in plotly, one column (the MLflow UI shows it in a narrow frame), plotly.js inlined (works
    offline); hover: method, layers, ratios, run id."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels, styles = plot_panels(points, fronts), method_styles(points)
    titles, rows = [_title(fr, len(points)) for fr in panels], len(panels)
    fig = make_subplots(rows=rows, cols=1, subplot_titles=titles, vertical_spacing=0.3 / rows)
    hover = "<b>%{customdata[0]}</b> %{customdata[1]}<br>layers %{customdata[2]}<br>train %{customdata[3]}"
    hover += "<br>infer %{customdata[4]}<br>%{x:.4g}, %{y:.2f} (95% CI %{customdata[6]})<br>%{customdata[7]}"
    hover += "<br>run %{customdata[5]}<extra></extra>"
    for k, fr in enumerate(panels):
        at, pa = {"row": k + 1, "col": 1}, _Panel.of(points, fr, list(styles))
        for method, idx in pa.by_method.items():
            colour, marker = styles[method]
            symbol = {"color": colour, "symbol": _PLOTLY_SYMBOLS[marker], "size": 14 if marker == "*" else 10}
            data = [_hover(points[i], fr, i) for i in idx]
            bars = {"type": "data", "symmetric": False, "array": pa.err[1, idx], "arrayminus": pa.err[0, idx]}
            trace = go.Scatter(x=pa.x[idx], y=pa.y[idx], mode="markers", name=method, legendgroup=method, marker=symbol)
            trace.update(error_y=bars | {"color": colour, "thickness": 1})
            fig.add_trace(trace.update(customdata=data, hovertemplate=hover, showlegend=k == 0), **at)
        if pa.on:
            line = go.Scatter(x=pa.x[pa.on], y=pa.y[pa.on], mode="lines", line={"shape": "hv", "color": "black"})
            fig.add_trace(line.update(name="Pareto frontier", showlegend=k == 0, hoverinfo="skip"), **at)
        for i, key in pa.labels:
            text, (dx, dy), _ = _LABELS[key]
            fig.add_annotation(x=pa.x[i], y=pa.y[i], text=text, arrowhead=2, ax=dx, ay=-dy, **at)
        fig.update_xaxes(title_text=_COST_LABELS.get(fr.cost, fr.cost), **at)
        fig.update_yaxes(title_text=f"{fr.accuracy} (%)", **at)
    fig.update_annotations(font_size=12)
    fig.update_layout(title="Accuracy-cost Pareto frontier", template="plotly_white", height=120 + 420 * rows)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
