"""Pareto frontiers of evaluated settings, without MLflow: which points no other beats (accuracy at least as
high, cost at most as high, one of the two strictly), and the table and CSV that show them.

A point is one evaluated setting (``Point``); a frontier (``Front``) is one accuracy metric against one cost
(``tflops`` or ``latency/prefill_ms``). Exact ties all stay on it; a point lacking either metric (NaN) is left out
and counted.

Noise (:func:`noise_status`): two accuracies are told apart when their difference exceeds 1.96 standard errors of
the difference, each point's standard error read from its 95% interval (``ci_low/``, ``ci_high/``: half its width
/ 1.96). A frontier point is on it beyond doubt when every point at most as costly is told apart from it (below
it), and within noise otherwise; a dominated point is within noise when some point dominating it is not told apart
from it. A point logged without an interval counts as exact.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from pipelines.eval.metrics import E2E_MS, MEAN, PREFILL_MS, TFLOPS

TAG_PREFIX = "pareto/"
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
FRONTIER, FRONTIER_NOISY = "frontier", "frontier-within-noise"
DOMINATED, DOMINATED_NOISY, EXCLUDED = "dominated", "dominated-within-noise", "excluded"
PAPER_SCHEDULE = (0.5, 0.3, 0.1)  # the paper's keep ratios after layers 1, 8, 16


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
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # accuracy key -> 95% (low, high)

    def interval(self, metric: str) -> tuple[float, float]:
        """The 95% interval of the accuracy metric ``metric`` (``accuracy/...``), (NaN, NaN) if not logged."""
        return self.intervals.get(metric.removeprefix("accuracy/"), (math.nan, math.nan))

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
        """A trained method (its run logs ``train_ratios``: LVPruning) at the paper's inference schedule."""
        r = self.infer_ratios
        return self.train_ratios is not None and r is not None and len(r) == 3 and np.allclose(r, PAPER_SCHEDULE)


@dataclass(frozen=True)
class Front:
    """One frontier over the points: ``mask[i]`` is point ``i`` on it; ``excluded``: points lacking a metric."""

    accuracy: str
    cost: str
    mask: np.ndarray
    excluded: int
    status: tuple[str, ...] = ()  # per point: FRONTIER, FRONTIER_NOISY, DOMINATED, DOMINATED_NOISY or EXCLUDED

    @property
    def beyond_doubt(self) -> int:
        return self.status.count(FRONTIER)

    @property
    def tag(self) -> str:
        return TAG_PREFIX + ("" if self.cost == TFLOPS else "latency/") + self.accuracy


def benchmarks(points: Sequence[Point]) -> list[str]:
    return sorted({b for p in points for b in p.benchmarks})


def categories(points: Sequence[Point], benchmark: str) -> list[str]:
    return sorted({k for p in points for k in p.accuracy if k.startswith(f"{benchmark}/")})


def noise_status(accuracy: ArrayLike, cost: ArrayLike, low: ArrayLike, high: ArrayLike) -> list[str]:
    """Each point's place on the frontier of ``accuracy`` against ``cost``, told apart from noise by the 95%
    intervals (``low``, ``high``; NaN: exact): see the module docstring. (n,) inputs, O(n^2)."""
    a, c = np.asarray(accuracy, dtype=float), np.asarray(cost, dtype=float)
    se = np.nan_to_num((np.asarray(high, dtype=float) - np.asarray(low, dtype=float)) / (2 * Z95))  # (n,)
    on, valid = pareto_mask(a, c), ~(np.isnan(a) | np.isnan(c))
    apart = np.abs(a[:, None] - a[None, :]) > Z95 * np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)  # (n, n)
    cheaper = (c[None, :] <= c[:, None]) & valid[None, :] & ~np.eye(len(a), dtype=bool)  # [i, j]: j costs <= i
    dominates = cheaper & (a[None, :] >= a[:, None]) & ((c[None, :] < c[:, None]) | (a[None, :] > a[:, None]))
    status = []
    for i in range(len(a)):
        if not valid[i]:
            status.append(EXCLUDED)
        elif on[i]:
            status.append(FRONTIER if apart[i, cheaper[i]].all() else FRONTIER_NOISY)
        else:
            status.append(DOMINATED if apart[i, dominates[i]].all() else DOMINATED_NOISY)
    return status


def front(points: Sequence[Point], accuracy: str = MEAN, cost: str = TFLOPS) -> Front:
    a = np.array([p.value(accuracy) for p in points], dtype=float)
    c = np.array([p.value(cost) for p in points], dtype=float)
    low, high = np.array([p.interval(accuracy) for p in points], dtype=float).reshape(-1, 2).T
    status = tuple(noise_status(a, c, low, high))
    return Front(accuracy, cost, pareto_mask(a, c), excluded_count(a, c), status)


def compute_fronts(points: Sequence[Point]) -> list[Front]:
    """accuracy/mean and each accuracy/<benchmark> against TFLOPs, then accuracy/mean against prefill latency."""
    pairs = [(MEAN, TFLOPS), *((f"accuracy/{b}", TFLOPS) for b in benchmarks(points)), (MEAN, PREFILL_MS)]
    return [front(points, a, c) for a, c in pairs]


def ratios_text(values: tuple[float, ...] | None) -> str:
    return "-".join(f"{x:g}" for x in values) if values else "-"


def layers_text(values: tuple[int, ...] | None) -> str:
    return ",".join(map(str, values)) if values else "-"


def number_text(value: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def interval_text(bounds: tuple[float, float]) -> str:
    return "-" if any(map(math.isnan, bounds)) else f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def accuracy_columns(points: Sequence[Point]) -> list[str]:
    """accuracy metrics in table order: per benchmark its categories then itself; the mean last."""
    return [f"accuracy/{k}" for b in benchmarks(points) for k in (*categories(points, b), b)] + [MEAN]


def pareto_table(points: Sequence[Point], front: Front) -> str:
    """The frontier's rows by cost: method, layers, ratios, TFLOPs, accuracy per category and benchmark, mean, the
    95% interval of the front's accuracy and whether the point is on the frontier beyond noise."""
    columns = accuracy_columns(points)
    accuracy = front.accuracy.removeprefix("accuracy/")
    head = ["method", "layers", "train", "infer", "tflops", *(c.removeprefix("accuracy/") for c in columns)]
    head += [f"{accuracy}_95%_ci", "status", "run"]
    on = sorted(
        np.flatnonzero(front.mask), key=lambda i: (points[i].value(front.cost), -points[i].value(front.accuracy))
    )
    rows = [
        [
            p.method,
            layers_text(p.layers),
            ratios_text(p.train_ratios),
            ratios_text(p.infer_ratios),
            number_text(p.tflops, ".4g"),
        ]
        + [number_text(p.value(c)) for c in columns]
        + [interval_text(p.interval(front.accuracy)), front.status[i], p.run_id[:8]]
        for i, p in ((i, points[i]) for i in on)
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    align = [str.ljust] * 4 + [str.rjust] * (len(head) - 6) + [str.ljust] * 2  # text left, numbers right
    return "\n".join("  ".join(a(c, w) for a, c, w in zip(align, row, widths)).rstrip() for row in [head, *rows])


def write_csv(points: Sequence[Point], fronts: Sequence[Front], path: str | Path) -> None:
    """One row per point: identity, params, metrics (empty when absent), each accuracy's 95% interval
    (``ci_low/...``, ``ci_high/...``), one true/false column per front and one with its noise status."""
    accuracies = accuracy_columns(points)
    metrics = [TFLOPS, PREFILL_MS, E2E_MS, *accuracies]
    bounds = [name for a in accuracies for name in (f"ci_low/{a}", f"ci_high/{a}")]
    head = ["run_id", "experiment", "run_name", "method", "layers", "train_ratios", "infer_ratios", *metrics, *bounds]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head + [fr.tag for fr in fronts] + [f"{fr.tag}/status" for fr in fronts])
        for i, p in enumerate(points):
            lists = [json.dumps(list(v)) if v is not None else "" for v in (p.layers, p.train_ratios, p.infer_ratios)]
            values = ["" if math.isnan(v) else repr(v) for v in [*map(p.value, metrics), *_bounds(p, accuracies)]]
            flags = ["true" if fr.mask[i] else "false" for fr in fronts] + [fr.status[i] for fr in fronts]
            writer.writerow([p.run_id, p.experiment, p.run_name, p.method, *lists, *values, *flags])


def _bounds(p: Point, accuracies: Sequence[str]) -> list[float]:
    return [bound for a in accuracies for bound in p.interval(a)]
