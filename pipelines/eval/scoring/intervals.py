"""Confidence intervals of a benchmark's headline score: the percentile bootstrap over questions.

Each scorer resamples its own scoring units (questions; MMBench's circular groups; POPE's questions within each
split) with replacement, ``RESAMPLES`` times, and recomputes its headline on each resample: the 2.5th and 97.5th
percentiles of those ``replicates`` are the 95% interval. The bootstrap fits every headline alike, means (accuracy,
VQA's soft accuracy, MM-Vet's grades), ratios (LLaVA-Bench's relative score) and F1 (POPE), where a closed form
such as Wilson's interval fits proportions only.

A benchmark's resamples are drawn from a seed of its name, so every setting evaluated on the same questions is
resampled alike; the mean over benchmarks averages the benchmarks' replicates, resample by resample (independent
draws: the benchmarks' questions are independent samples).

Shapes: R resamples, n units.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
CHUNK = 100  # resamples drawn at once: (100, n) counts, bounded memory on VQAv2's 107k questions


def bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray], seed: str) -> np.ndarray:
    """``statistic`` on ``RESAMPLES`` resamples of ``n`` units, (R,). ``statistic`` takes the resamples as counts,
    (r, n) float: how often each unit was drawn (each row sums to n), so a mean is ``counts @ values / n``.
    ``seed``: the benchmark (and split) whose questions are resampled."""
    if n == 0:
        return np.full(RESAMPLES, np.nan)
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    out = []
    for start in range(0, RESAMPLES, CHUNK):
        r = min(CHUNK, RESAMPLES - start)
        draws = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]  # (r, n): row i's units at i * n + j
        counts = np.bincount(draws.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        out.append(statistic(counts))
    return np.concatenate(out)


def mean_replicates(values: Sequence[float], seed: str, scale: float = 100.0) -> np.ndarray:
    """Replicates of ``scale`` x the mean of ``values`` (per-question scores or hits), (R,)."""
    x = np.asarray(values, dtype=np.float64)
    return bootstrap(len(x), lambda counts: scale * (counts @ x) / len(x), seed)


def interval(replicates: np.ndarray) -> tuple[float, float]:
    """The ``LEVEL`` percentile interval of bootstrap ``replicates``, (low, high)."""
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)
