"""The accuracy-cost Pareto frontier of evaluated settings in MLflow: tags on their runs, and a ``frontier`` run.

A point is an evaluated setting's run (``pipelines.eval.evaluation.run_setting``, or a sweep's): FINISHED, with the
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

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.eval.metrics import MEAN, TFLOPS, interval_names
from pipelines.frontier.pareto import TAG_PREFIX, Front, Point, compute_fronts, pareto_table, write_csv
from pipelines.frontier.plots import plot_html, plot_png
from pipelines.tracking import KIND_TAG, get_or_create_experiment

FRONTIER = "frontier"


@dataclass
class FrontierResult:
    points: list[Point]
    fronts: list[Front]  # the first is accuracy/mean against TFLOPs
    run_id: str  # the new ``frontier`` run
    experiment_id: str  # where that run is
    table: str  # :func:`pareto_table` of the first front
    tags_set: int = 0
    tags_removed: int = 0


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


def intervals(metrics: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Each accuracy's logged 95% interval (``ci_low/accuracy/<k>``, ``ci_high/...``), keyed ``<k>``."""
    out = {}
    for name in metrics:
        if name.startswith("accuracy/"):
            low, high = interval_names(name)
            if low in metrics and high in metrics:
                out[name.removeprefix("accuracy/")] = (float(metrics[low]), float(metrics[high]))
    return out


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
        intervals=intervals(metrics),
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
    experiment_id = get_or_create_experiment(client, out)
    run_id = log_frontier_run(client, experiment_id, experiments, points, fronts, table)
    return FrontierResult(points, fronts, run_id, experiment_id, table, added, removed)
