"""Pareto frontiers of evaluated settings, without MLflow: which points no other beats (accuracy at least as
high, cost at most as high, one of the two strictly), and the table and CSV that show them.

A point is one evaluated setting (``Point``); a frontier (``Front``) is one accuracy metric against one cost
(``tflops`` or ``latency/prefill_ms``). Exact ties all stay on it; a point lacking either metric (NaN) is left out
and counted.
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

    @property
    def tag(self) -> str:
        return TAG_PREFIX + ("" if self.cost == TFLOPS else "latency/") + self.accuracy


def benchmarks(points: Sequence[Point]) -> list[str]:
    return sorted({b for p in points for b in p.benchmarks})


def categories(points: Sequence[Point], benchmark: str) -> list[str]:
    return sorted({k for p in points for k in p.accuracy if k.startswith(f"{benchmark}/")})


def front(points: Sequence[Point], accuracy: str = MEAN, cost: str = TFLOPS) -> Front:
    a = np.array([p.value(accuracy) for p in points], dtype=float)
    c = np.array([p.value(cost) for p in points], dtype=float)
    return Front(accuracy, cost, pareto_mask(a, c), excluded_count(a, c))


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


def accuracy_columns(points: Sequence[Point]) -> list[str]:
    """accuracy metrics in table order: per benchmark its categories then itself; the mean last."""
    return [f"accuracy/{k}" for b in benchmarks(points) for k in (*categories(points, b), b)] + [MEAN]


def pareto_table(points: Sequence[Point], front: Front) -> str:
    """The frontier's rows by cost: method, layers, ratios, TFLOPs, accuracy per category and benchmark, mean."""
    columns = accuracy_columns(points)
    head = ["method", "layers", "train", "infer", "tflops", *(c.removeprefix("accuracy/") for c in columns), "run"]
    rows = [
        [
            p.method,
            layers_text(p.layers),
            ratios_text(p.train_ratios),
            ratios_text(p.infer_ratios),
            number_text(p.tflops, ".4g"),
        ]
        + [number_text(p.value(c)) for c in columns]
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
    metrics = [TFLOPS, PREFILL_MS, E2E_MS, *accuracy_columns(points)]
    head = ["run_id", "experiment", "run_name", "method", "layers", "train_ratios", "infer_ratios", *metrics]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head + [fr.tag for fr in fronts])
        for i, p in enumerate(points):
            lists = [json.dumps(list(v)) if v is not None else "" for v in (p.layers, p.train_ratios, p.infer_ratios)]
            values = ["" if math.isnan(v := p.value(m)) else repr(v) for m in metrics]
            flags = ["true" if fr.mask[i] else "false" for fr in fronts]
            writer.writerow([p.run_id, p.experiment, p.run_name, p.method, *lists, *values, *flags])
