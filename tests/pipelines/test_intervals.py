"""The scorers' 95% intervals: calibrated (coverage on simulated benchmarks), close to Wilson's interval for
accuracies, and for POPE's F1 and LLaVA-Bench's ratio equal to a slow bootstrap that rescores each resample with the
scorer's own metric code."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from pipelines.eval.scoring.intervals import CHUNK, RESAMPLES, bootstrap, interval, mean_replicates
from pipelines.eval.scoring.pope import binary_metrics, f1_replicates


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def resamples(n: int, seed: str) -> list[np.ndarray]:
    """The unit indices of each resample, drawn as ``bootstrap`` draws them (its seed and chunking)."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    out = []
    for start in range(0, RESAMPLES, CHUNK):
        out += list(rng.integers(0, n, size=(min(CHUNK, RESAMPLES - start), n)))
    return out


def test_accuracy_intervals_are_close_to_wilson():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(150, 3000))
        hits = rng.random(n) < rng.uniform(0.2, 0.95)
        low, high = interval(mean_replicates(hits, f"bench-{n}"))
        w_low, w_high = wilson(int(hits.sum()), n)
        tolerance = 0.25 * (w_high - w_low)  # the bootstrap's Monte Carlo error at 1000 resamples, and skew
        assert low == pytest.approx(w_low, abs=tolerance) and high == pytest.approx(w_high, abs=tolerance)


def test_intervals_cover_the_true_accuracy_95_percent_of_the_time():
    rng, covered, trials = np.random.default_rng(1), 0, 300
    for trial in range(trials):
        p = rng.uniform(0.3, 0.9)
        hits = rng.random(400) < p
        low, high = interval(mean_replicates(hits, f"trial-{trial}"))
        covered += low <= 100 * p <= high
    assert 0.91 <= covered / trials <= 0.985  # binomial spread of 300 trials around 0.95


def test_pope_f1_replicates_rescore_each_resample_with_the_scorer():
    rng = np.random.default_rng(2)
    n = 120
    labels = ["yes" if x else "no" for x in rng.random(n) < 0.5]
    preds = [lab if rng.random() < 0.8 else ("no" if lab == "yes" else "yes") for lab in labels]
    fast = f1_replicates(preds, labels, "pope/random")
    slow = [
        binary_metrics([preds[i] for i in draw], [labels[i] for i in draw])["f1"]
        for draw in resamples(n, "pope/random")
    ]
    np.testing.assert_allclose(fast, slow, rtol=1e-9)
    low, high = interval(fast)
    assert low < binary_metrics(preds, labels)["f1"] < high


def test_a_ratio_of_means_rescored_per_resample():
    """LLaVA-Bench's relative score: 100 * mean(model) / mean(reference), per resample."""
    rng = np.random.default_rng(3)
    reference, model = rng.integers(5, 11, 60).astype(float), rng.integers(1, 11, 60).astype(float)
    fast = bootstrap(60, lambda counts: 100 * (counts @ model) / (counts @ reference), "llava_bench")
    slow = [100 * model[draw].mean() / reference[draw].mean() for draw in resamples(60, "llava_bench")]
    np.testing.assert_allclose(fast, slow, rtol=1e-9)


def test_settings_on_the_same_questions_are_resampled_alike_and_empty_ones_are_nan():
    a, b = np.arange(50) % 2, np.arange(50) % 3 == 0
    draws = resamples(50, "toy")
    np.testing.assert_allclose(mean_replicates(b, "toy"), [100 * b[d].mean() for d in draws])
    assert not np.array_equal(mean_replicates(a, "toy"), mean_replicates(a, "gqa"))
    assert np.isnan(mean_replicates([], "toy")).all()
