"""The accuracy-cost Pareto frontier of evaluated settings in MLflow: tags on their runs, and a ``frontier`` run.

A point is an evaluated setting's run (``pipelines.evaluation.run_setting``, or a sweep's): FINISHED, with the
metrics ``tflops`` and ``accuracy/mean``. Other runs (training, sweep parents, trials, earlier ``frontier`` runs)
are not points. Accuracy up and cost down are better; the frontiers:

- ``accuracy/mean`` and each ``accuracy/<benchmark>`` against ``tflops``: tags ``pareto/accuracy/mean``,
  ``pareto/accuracy/<benchmark>``;
- ``accuracy/mean`` against ``latency/prefill_ms``: tag ``pareto/latency/accuracy/mean``.

A run on a frontier carries its tag ``"true"``; a run that carries a ``pareto/`` tag it no longer earns loses it.
A point without a frontier's two metrics (NaN, or a benchmark it was not run on) is left out of it and counted.
The ``frontier`` run (tag ``lvpruning.kind=frontier``) holds ``frontier.png``, ``frontier.html`` (plotly, inlined
so the UI shows it offline) and ``frontier.csv`` (every point, one flag column per frontier).
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from pipelines.tracking import KIND_TAG

FRONTIER = "frontier"
TAG_PREFIX = "pareto/"
TFLOPS, PREFILL_MS = "tflops", "latency/prefill_ms"
MEAN = "accuracy/mean"
PAPER_SCHEDULE = (0.5, 0.3, 0.1)  # the paper's keep ratios after layers 1, 8, 16
METHODS = ("none", "lvpruning", "random", "fastv")  # fixed colours and markers; other methods come after
_COLOURS = ("#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X", "h")
_PLOTLY_SYMBOLS = {"*": "star", "o": "circle", "s": "square", "^": "triangle-up", "D": "diamond"}
_PLOTLY_SYMBOLS |= {"v": "triangle-down", "P": "cross", "X": "x", "h": "hexagon"}
_LABELS = {  # annotation: text, offset in points (up is +), alignment; the baseline is the costliest point
    "none": ("no pruning", (-14, 14), "right"),
    "paper": ("paper's schedule 0.5-0.3-0.1", (14, -22), "left"),
}
_COST_LABELS = {TFLOPS: "TFLOPs (prefill, 1 image + 30 text tokens)", PREFILL_MS: "prefill latency (ms, median)"}


def pareto_mask(accuracy: ArrayLike, cost: ArrayLike) -> np.ndarray:
    """``(n,)`` bool: the points no other point dominates (accuracy >= and cost <=, one of them strictly). Exact
    ties all stay; a point with a NaN coordinate is never on it (:func:`excluded_count` counts them).
    O(n log n): sort by cost, then compare each cost's best accuracy with the best at any lower cost."""
    a, c = np.asarray(accuracy, dtype=float).ravel(), np.asarray(cost, dtype=float).ravel()
    if a.shape != c.shape:
        raise ValueError(f"accuracy and cost differ in length: {a.size} vs {c.size}")
    mask = np.zeros(a.shape, dtype=bool)
    valid = np.flatnonzero(~(np.isnan(a) | np.isnan(c)))
    if valid.size == 0:
        return mask
    order = valid[np.lexsort((-a[valid], c[valid]))]  # (m,) cost up, then accuracy down
    acc, cst = a[order], c[order]
    first = np.r_[True, cst[1:] != cst[:-1]]  # (m,) first (most accurate) point of each equal-cost group
    group = np.cumsum(first) - 1  # (m,) group index
    best = acc[first]  # (g,) best accuracy per cost
    improves = np.r_[True, best[1:] > np.maximum.accumulate(best)[:-1]]  # (g,) beats every cheaper cost
    mask[order] = (acc == best[group]) & improves[group]
    return mask


def excluded_count(accuracy: ArrayLike, cost: ArrayLike) -> int:
    """How many points :func:`pareto_mask` leaves out for a NaN coordinate."""
    a, c = np.asarray(accuracy, dtype=float).ravel(), np.asarray(cost, dtype=float).ravel()
    return int(np.count_nonzero(np.isnan(a) | np.isnan(c)))


@dataclass(frozen=True)
class Point:
    """One evaluated setting. ``accuracy`` keys drop the ``accuracy/`` prefix: ``mean``, ``<benchmark>``,
    ``<benchmark>/<category>``; ``latency`` keys: ``prefill_ms``, ``e2e_ms``."""

    run_id: str
    experiment: str
    run_name: str
    method: str
    layers: tuple[int, ...] | None
    train_ratios: tuple[float, ...] | None
    infer_ratios: tuple[float, ...] | None
    tflops: float
    accuracy: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        """The MLflow metric ``metric`` of this run (``tflops``, ``accuracy/...``, ``latency/...``), NaN if absent."""
        if metric == TFLOPS:
            return self.tflops
        kind, _, key = metric.partition("/")
        return {"accuracy": self.accuracy, "latency": self.latency}.get(kind, {}).get(key, math.nan)

    @property
    def benchmarks(self) -> list[str]:
        return [k for k in self.accuracy if "/" not in k and k != "mean"]

    @property
    def is_paper_schedule(self) -> bool:
        r = self.infer_ratios
        return self.method == "lvpruning" and r is not None and len(r) == 3 and np.allclose(r, PAPER_SCHEDULE)


@dataclass(frozen=True)
class Front:
    """One frontier over the points: ``mask[i]`` is point ``i`` on it; ``excluded``: points lacking a metric."""

    accuracy: str
    cost: str
    mask: np.ndarray
    excluded: int

    @property
    def tag(self) -> str:
        return TAG_PREFIX + ("" if self.cost == TFLOPS else "latency/") + self.accuracy


@dataclass
class FrontierResult:
    points: list[Point]
    fronts: list[Front]  # the first is accuracy/mean against TFLOPs
    run_id: str  # the new ``frontier`` run
    experiment_id: str  # where that run is
    table: str  # :func:`pareto_table` of the first front
    tags_set: int = 0
    tags_removed: int = 0


def benchmarks(points: Sequence[Point]) -> list[str]:
    return sorted({b for p in points for b in p.benchmarks})


def categories(points: Sequence[Point], benchmark: str) -> list[str]:
    return sorted({k for p in points for k in p.accuracy if k.startswith(f"{benchmark}/")})


def experiment_ids(client: Any, names: Sequence[str]) -> dict[str, str]:
    """Experiment name -> id; a name that does not exist is an error naming it."""
    found = {name: client.get_experiment_by_name(name) for name in names}
    missing = [name for name, e in found.items() if e is None]
    if missing:
        raise ValueError(f"no MLflow experiment named {', '.join(map(repr, missing))}")
    return {name: e.experiment_id for name, e in found.items()}


def search_all(client: Any, experiment_ids: Sequence[str]) -> list[Any]:
    """Every active run of the experiments, over all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _parse_list(text: str | None, kind: type) -> tuple | None:
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return tuple(kind(x) for x in value) if isinstance(value, list) else None


def as_point(run: Any, experiment: str) -> Point | None:
    """The run as a point, or None when it is not an evaluated setting (see the module docstring)."""
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    if run.info.status != "FINISHED" or tags.get(KIND_TAG) == FRONTIER or not {TFLOPS, MEAN} <= set(metrics):
        return None
    return Point(
        run_id=run.info.run_id,
        experiment=experiment,
        run_name=run.info.run_name or "",
        method=params.get("method", "?"),
        layers=_parse_list(params.get("layers"), int),
        train_ratios=_parse_list(params.get("train_ratios"), float),
        infer_ratios=_parse_list(params.get("infer_ratios"), float),
        tflops=float(metrics[TFLOPS]),
        accuracy={k.removeprefix("accuracy/"): float(v) for k, v in metrics.items() if k.startswith("accuracy/")},
        latency={k.removeprefix("latency/"): float(v) for k, v in metrics.items() if k.startswith("latency/")},
    )


def read_points(client: Any, experiments: Sequence[str]) -> tuple[list[Point], list[Any]]:
    """The points of the named experiments (by TFLOPs, then run id), and every run read (to fix their tags)."""
    points, runs = [], []
    for name, experiment_id in experiment_ids(client, experiments).items():
        found = search_all(client, [experiment_id])
        runs += found
        points += [p for p in (as_point(run, name) for run in found) if p is not None]
    points.sort(key=lambda p: (math.isnan(p.tflops), p.tflops, p.run_id))
    return points, runs


def front(points: Sequence[Point], accuracy: str = MEAN, cost: str = TFLOPS) -> Front:
    a = np.array([p.value(accuracy) for p in points], dtype=float)
    c = np.array([p.value(cost) for p in points], dtype=float)
    return Front(accuracy, cost, pareto_mask(a, c), excluded_count(a, c))


def compute_fronts(points: Sequence[Point]) -> list[Front]:
    """accuracy/mean and each accuracy/<benchmark> against TFLOPs, then accuracy/mean against prefill latency."""
    pairs = [(MEAN, TFLOPS), *((f"accuracy/{b}", TFLOPS) for b in benchmarks(points)), (MEAN, PREFILL_MS)]
    return [front(points, a, c) for a, c in pairs]


def sync_tags(client: Any, runs: Sequence[Any], points: Sequence[Point], fronts: Sequence[Front]) -> tuple[int, int]:
    """Set each front's tag on its runs, delete ``pareto/`` tags that no longer hold; returns (set, deleted)."""
    wanted: dict[str, set[str]] = {p.run_id: set() for p in points}
    for f in fronts:
        for p, on in zip(points, f.mask):
            if on:
                wanted[p.run_id].add(f.tag)
    added = removed = 0
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        held = {k for k in tags if k.startswith(TAG_PREFIX)}
        target = wanted.get(run_id, set())
        for tag in sorted(t for t in target if tags.get(t) != "true"):
            client.set_tag(run_id, tag, "true")
            added += 1
        for tag in sorted(held - target):
            client.delete_tag(run_id, tag)
            removed += 1
    return added, removed


def _ratios(values: tuple[float, ...] | None) -> str:
    return "-".join(f"{x:g}" for x in values) if values else "-"


def _layers(values: tuple[int, ...] | None) -> str:
    return ",".join(map(str, values)) if values else "-"


def _num(value: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def accuracy_columns(points: Sequence[Point]) -> list[str]:
    """accuracy metrics in table order: per benchmark its categories then itself; the mean last."""
    return [f"accuracy/{k}" for b in benchmarks(points) for k in (*categories(points, b), b)] + [MEAN]


def pareto_table(points: Sequence[Point], front: Front) -> str:
    """The frontier's rows by cost: method, layers, ratios, TFLOPs, accuracy per category and benchmark, mean."""
    columns = accuracy_columns(points)
    head = ["method", "layers", "train", "infer", "tflops", *(c.removeprefix("accuracy/") for c in columns), "run"]
    rows = [
        [p.method, _layers(p.layers), _ratios(p.train_ratios), _ratios(p.infer_ratios), _num(p.tflops, ".4g")]
        + [_num(p.value(c)) for c in columns]
        + [p.run_id[:8]]
        for p in sorted(
            (p for p, on in zip(points, front.mask) if on),
            key=lambda p: (p.value(front.cost), -p.value(front.accuracy)),
        )
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    align = [str.ljust] * 4 + [str.rjust] * (len(head) - 5) + [str.ljust]  # text left, numbers right
    return "\n".join("  ".join(a(c, w) for a, c, w in zip(align, row, widths)).rstrip() for row in [head, *rows])


def write_csv(points: Sequence[Point], fronts: Sequence[Front], path: str | Path) -> None:
    """One row per point: identity, params, metrics (empty when absent), one true/false column per front."""
    metrics = [TFLOPS, "latency/prefill_ms", "latency/e2e_ms", *accuracy_columns(points)]
    head = ["run_id", "experiment", "run_name", "method", "layers", "train_ratios", "infer_ratios", *metrics]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head + [fr.tag for fr in fronts])
        for i, p in enumerate(points):
            lists = [json.dumps(list(v)) if v is not None else "" for v in (p.layers, p.train_ratios, p.infer_ratios)]
            values = ["" if math.isnan(v := p.value(m)) else repr(v) for m in metrics]
            flags = ["true" if fr.mask[i] else "false" for fr in fronts]
            writer.writerow([p.run_id, p.experiment, p.run_name, p.method, *lists, *values, *flags])


def method_styles(points: Sequence[Point]) -> dict[str, tuple[str, str]]:
    """Method -> (colour, matplotlib marker): fixed for the known methods, then the others by name."""
    extra = sorted({p.method for p in points} - set(METHODS))
    return {m: (_COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]) for i, m in enumerate([*METHODS, *extra])}


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
    by_method: dict[str, list[int]]  # method -> indices of its plottable points
    on: list[int]  # frontier indices by cost
    labels: list[tuple[int, str]]  # (index, key of _LABELS): the baseline and the paper's schedule

    @classmethod
    def of(cls, points: Sequence[Point], fr: Front, methods: Sequence[str]) -> _Panel:
        x, y = (np.array([p.value(m) for p in points], dtype=float) for m in (fr.cost, fr.accuracy))
        ok = [i for i in range(len(points)) if not (np.isnan(x[i]) or np.isnan(y[i]))]
        by_method = {m: [i for i in ok if points[i].method == m] for m in methods}
        on = sorted(np.flatnonzero(fr.mask).tolist(), key=lambda i: x[i])
        labels = [(i, "none") for i in ok if points[i].method == "none"]
        labels += [(i, "paper") for i in ok if points[i].is_paper_schedule]
        return cls(x, y, {m: idx for m, idx in by_method.items() if idx}, on, labels)


def _title(fr: Front, n: int) -> str:
    excluded = f", {fr.excluded} excluded" if fr.excluded else ""
    return f"{fr.accuracy} vs {fr.cost}: {int(fr.mask.sum())} of {n} on the frontier{excluded}"


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
            ax.scatter(pa.x[idx], pa.y[idx], c=colour, marker=marker, s=140 if marker == "*" else 50, label=method)
        if pa.on:
            ax.step(pa.x[pa.on], pa.y[pa.on], where="post", color="black", lw=1.2, alpha=0.6, label="Pareto frontier")
            ax.scatter(pa.x[pa.on], pa.y[pa.on], s=160, facecolors="none", edgecolors="black", lw=1, zorder=4)
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


def _hover(p: Point) -> list[str]:
    return [p.method, p.run_name, _layers(p.layers), _ratios(p.train_ratios), _ratios(p.infer_ratios), p.run_id]


def plot_html(points: Sequence[Point], fronts: Sequence[Front], path: str | Path) -> None:
    """The PNG's panels in plotly, one column (the MLflow UI shows it in a narrow frame), plotly.js inlined (works
    offline); hover: method, layers, ratios, run id."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels, styles = plot_panels(points, fronts), method_styles(points)
    titles, rows = [_title(fr, len(points)) for fr in panels], len(panels)
    fig = make_subplots(rows=rows, cols=1, subplot_titles=titles, vertical_spacing=0.3 / rows)
    hover = "<b>%{customdata[0]}</b> %{customdata[1]}<br>layers %{customdata[2]}<br>train %{customdata[3]}"
    hover += "<br>infer %{customdata[4]}<br>%{x:.4g}, %{y:.2f}<br>run %{customdata[5]}<extra></extra>"
    for k, fr in enumerate(panels):
        at, pa = {"row": k + 1, "col": 1}, _Panel.of(points, fr, list(styles))
        for method, idx in pa.by_method.items():
            colour, marker = styles[method]
            symbol = {"color": colour, "symbol": _PLOTLY_SYMBOLS[marker], "size": 14 if marker == "*" else 10}
            data = [_hover(points[i]) for i in idx]
            trace = go.Scatter(x=pa.x[idx], y=pa.y[idx], mode="markers", name=method, legendgroup=method, marker=symbol)
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


def log_frontier_run(
    client: Any,
    experiment_id: str,
    experiments: Sequence[str],
    points: Sequence[Point],
    fronts: Sequence[Front],
    table: str,
) -> str:
    """A new FINISHED ``frontier`` run with the PNG, HTML and CSV (FAILED if writing them fails); returns its id."""
    from mlflow.entities import Param

    tags = {KIND_TAG: FRONTIER, "mlflow.note.content": f"Pareto frontier, {MEAN} vs {TFLOPS}:\n\n```\n{table}\n```"}
    run_id = client.create_run(experiment_id, run_name=FRONTIER, tags=tags).info.run_id
    try:
        main = fronts[0]
        params = {"experiments": json.dumps(list(experiments)), "points": len(points), "excluded": main.excluded}
        params |= {"on_frontier": int(main.mask.sum())}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            plot_png(points, fronts, Path(tmp) / "frontier.png")
            plot_html(points, fronts, Path(tmp) / "frontier.html")
            write_csv(points, fronts, Path(tmp) / "frontier.csv")
            client.log_artifacts(run_id, tmp)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_frontier(uri: str, experiments: Sequence[str], output_experiment: str | None = None) -> FrontierResult:
    """Read the points of ``experiments``, fix the ``pareto/`` tags of their runs, log a new ``frontier`` run in
    ``output_experiment`` (created if missing; default: the first experiment). Idempotent up to that new run."""
    from mlflow import MlflowClient

    if not experiments:
        raise ValueError("name at least one experiment")
    client = MlflowClient(uri)
    points, runs = read_points(client, experiments)
    if not points:
        raise ValueError(
            f"no evaluated settings (FINISHED runs with {TFLOPS} and {MEAN}) in experiments {list(experiments)}"
        )
    fronts = compute_fronts(points)
    added, removed = sync_tags(client, runs, points, fronts)
    table = pareto_table(points, fronts[0])
    out = output_experiment or experiments[0]
    found = client.get_experiment_by_name(out)
    experiment_id = found.experiment_id if found else client.create_experiment(out)
    run_id = log_frontier_run(client, experiment_id, experiments, points, fronts, table)
    return FrontierResult(points, fronts, run_id, experiment_id, table, added, removed)
