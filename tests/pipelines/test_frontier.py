"""``pipelines.frontier.run``: the Pareto mask against the definition, and the frontier of a real MLflow store."""

from __future__ import annotations

import csv
import functools
import json
import math
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from pipelines.frontier.pareto import (
    DOMINATED,
    DOMINATED_NOISY,
    EXCLUDED,
    FRONTIER,
    FRONTIER_NOISY,
    Point,
    compute_fronts,
    excluded_count,
    noise_status,
    pareto_mask,
)
from pipelines.frontier.plots import method_styles, plot_html, plot_png
from pipelines.frontier.run import run_frontier
from pipelines.tracking import KIND_TAG

ARTIFACTS = ("frontier.png", "frontier.html", "frontier.csv")


def brute_force(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Straight from the definition: on the frontier unless another point has accuracy >= and cost <=, one
    strictly; a point with a NaN is neither on it nor dominates."""
    ok = ~(np.isnan(accuracy) | np.isnan(cost))
    out = np.zeros(len(accuracy), dtype=bool)
    for i in np.flatnonzero(ok):
        out[i] = not any(
            accuracy[j] >= accuracy[i] and cost[j] <= cost[i] and (accuracy[j] > accuracy[i] or cost[j] < cost[i])
            for j in np.flatnonzero(ok)
        )
    return out


def random_points(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(0, 60))
    if kind == "integers":  # few distinct values: ties in one coordinate or both, everywhere
        a, c = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)
    elif kind == "duplicates":  # whole points repeated
        a, c = rng.random(max(n // 3, 1)), rng.random(max(n // 3, 1))
        pick = rng.integers(0, a.size, n)
        a, c = a[pick], c[pick]
    else:
        a, c = rng.normal(size=n), rng.exponential(size=n)
    if kind == "nan" and n:
        a[rng.random(n) < 0.2] = np.nan
        c[rng.random(n) < 0.2] = np.nan
    return a, c


@pytest.mark.parametrize("kind", ["continuous", "integers", "duplicates", "nan"])
def test_pareto_mask_matches_the_definition_on_random_point_sets(kind):
    rng = np.random.default_rng(["continuous", "integers", "duplicates", "nan"].index(kind))
    for _ in range(150):
        a, c = random_points(rng, kind)
        got = pareto_mask(a, c)
        assert got.dtype == bool and got.shape == a.shape
        np.testing.assert_array_equal(got, brute_force(a, c), err_msg=f"accuracy {a.tolist()}, cost {c.tolist()}")
        assert excluded_count(a, c) == int(np.sum(np.isnan(a) | np.isnan(c)))


@pytest.mark.parametrize(
    ("accuracy", "cost", "expected", "excluded"),
    [
        ([], [], [], 0),
        ([70.0], [3.0], [True], 0),
        ([math.nan], [3.0], [False], 1),
        ([70.0, 70.0], [3.0, 3.0], [True, True], 0),  # exact ties both stay
        ([70.0, 71.0], [3.0, 3.0], [False, True], 0),  # same cost: the more accurate
        ([70.0, 70.0], [3.0, 2.0], [False, True], 0),  # same accuracy: the cheaper
        ([70.0, 80.0, 75.0], [2.0, 8.0, 9.0], [True, True, False], 0),
        ([70.0, math.nan, 80.0], [2.0, 1.0, math.nan], [True, False, False], 2),  # NaN neither on it nor dominating
    ],
)
def test_pareto_mask_small_cases(accuracy, cost, expected, excluded):
    assert pareto_mask(accuracy, cost).tolist() == expected
    assert excluded_count(accuracy, cost) == excluded


def test_pareto_mask_is_not_quadratic():
    rng = np.random.default_rng(0)
    x = rng.random(200_000)
    a, c = np.r_[x, x - 1.0], np.r_[x, x]  # the first half is exactly the frontier
    start = time.perf_counter()
    mask = pareto_mask(a, c)
    assert mask[: x.size].all() and not mask[x.size :].any()
    assert time.perf_counter() - start < 5  # brute force would take hours


def test_pareto_mask_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        pareto_mask([1.0, 2.0], [1.0])


# -- a real store ------------------------------------------------------------------------------------------------


def log_setting(client, experiment_id, name, method, metrics, *, ratios=None, tags=None, status="FINISHED"):
    """A run shaped like ``pipelines.eval.evaluation.run_setting``'s."""
    run_id = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
    params = {"method": method, "infer_ratios": json.dumps(ratios) if ratios else "none"}
    if method != "none":
        params["layers"] = "[1, 8, 16]"
    if method == "lvpruning":
        params["train_ratios"] = "[0.5, 0.3, 0.1]"
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    client.set_terminated(run_id, status)
    return run_id


def slow_noise_status(accuracy, cost, low, high):
    """The noise rule point by point: two points are told apart when |a_i - a_j| > 1.96 sqrt(se_i^2 + se_j^2),
    se = interval width / 3.92 (0 without one)."""
    n, out = len(accuracy), []
    se = [0.0 if math.isnan(lo) else (hi - lo) / (2 * 1.959964) for lo, hi in zip(low, high)]
    valid = [not (math.isnan(accuracy[i]) or math.isnan(cost[i])) for i in range(n)]

    def apart(i, j):
        return abs(accuracy[i] - accuracy[j]) > 1.959964 * math.sqrt(se[i] ** 2 + se[j] ** 2)

    for i in range(n):
        if not valid[i]:
            out.append(EXCLUDED)
            continue
        others = [j for j in range(n) if j != i and valid[j]]
        dominators = [
            j for j in others
            if cost[j] <= cost[i] and accuracy[j] >= accuracy[i] and (cost[j] < cost[i] or accuracy[j] > accuracy[i])
        ]  # fmt: skip
        if dominators:
            out.append(DOMINATED if all(apart(i, j) for j in dominators) else DOMINATED_NOISY)
        else:
            cheaper = [j for j in others if cost[j] <= cost[i]]
            out.append(FRONTIER if all(apart(i, j) for j in cheaper) else FRONTIER_NOISY)
    return out


def test_noise_status_matches_the_rule_on_random_point_sets():
    rng, seen = np.random.default_rng(0), set()
    for _ in range(6):
        n = 40
        accuracy, cost = rng.uniform(50, 90, n).round(1), rng.integers(1, 15, n).astype(float)
        half = rng.uniform(0.2, 4.0, n)
        low, high = accuracy - half, accuracy + half
        accuracy[rng.random(n) < 0.1] = math.nan
        low[rng.random(n) < 0.2] = math.nan  # runs logged before intervals: exact
        expected = slow_noise_status(accuracy.tolist(), cost.tolist(), low.tolist(), high.tolist())
        assert noise_status(accuracy, cost, low, high) == expected
        seen |= set(expected)
    assert seen == {FRONTIER, FRONTIER_NOISY, DOMINATED, DOMINATED_NOISY, EXCLUDED}  # the draws exercise the rule


def test_the_toy_sweep_frontier_of_issue_31_is_mostly_within_noise():
    """VisionZip 91.25 and 95.00, VFlowOpt 95.62, TransPrune 96.88 and 97.50 at growing TFLOPs, 160 questions
    each (Wilson's intervals): only the cheapest is on the frontier beyond doubt."""
    accuracy = np.array([91.25, 95.00, 95.62, 96.88, 97.50, 80.0])
    cost = np.array([6.8e-5, 7.9e-5, 9.1e-5, 1.0e-4, 1.09e-4, 1.2e-4])
    z, n, p = 1.959964, 160, accuracy / 100
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    status = noise_status(accuracy, cost, 100 * (centre - half), 100 * (centre + half))
    assert status == [FRONTIER, *[FRONTIER_NOISY] * 4, DOMINATED]  # 80.0 at the highest cost: beaten beyond noise
    assert noise_status(accuracy, cost, accuracy, accuracy)[:5] == [FRONTIER] * 5  # exact values: all apart


def setting_metrics(tflops, toy, pope, prefill_ms=None):
    out = {"tflops": tflops, "accuracy/toy": toy, "accuracy/pope": pope, "accuracy/mean": (toy + pope) / 2}
    out |= {"accuracy/toy/color": toy + 2, "accuracy/toy/count": toy - 2, "latency/e2e_ms": 2 * tflops}
    return out | ({"latency/prefill_ms": prefill_ms} if prefill_ms is not None else {})


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Two experiments of evaluated settings, and runs the frontier must ignore or clean up."""
    monkeypatch.chdir(tmp_path)  # default artifact roots land here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    main, other = client.create_experiment("frontier-main"), client.create_experiment("frontier-other")
    log, paper, stale = functools.partial(log_setting, client), [0.5, 0.3, 0.1], {"pareto/accuracy/mean": "true"}
    nan_mean = setting_metrics(1.0, 40, 40, prefill_ms=1) | {"accuracy/mean": math.nan}
    two_stale = stale | {"pareto/accuracy/gqa": "true"}  # gqa: no such benchmark any more
    ids = {
        "none": log(main, "none", "none", setting_metrics(8.6, 80, 86, prefill_ms=90)),
        "paper": log(main, "lv", "lvpruning", setting_metrics(3.7, 77, 83, prefill_ms=40), ratios=paper),
        "lv_low": log(main, "lv", "lvpruning", setting_metrics(3.0, 74, 80, 35), ratios=[0.45, 0.25, 0.05]),
        # dominated by the paper's schedule (more TFLOPs, less accurate) but faster in wall time; stale tags
        "random": log(main, "rand", "random", setting_metrics(3.8, 70, 76, 30), ratios=paper, tags=two_stale),
        # best on pope alone; no latency (excluded from the latency frontier)
        "fastv": log(other, "fastv", "fastv", setting_metrics(3.4, 60, 82), ratios=paper),
        "nan": log(other, "nan", "random", nan_mean, ratios=paper, tags=stale),
    }
    parent = client.create_run(main, run_name="sweep", tags=stale).info.run_id  # a sweep's parent: not a point
    client.set_terminated(parent)
    nested = setting_metrics(9.0, 50, 50, prefill_ms=95)
    ids["nested"] = log(
        main, "nested", "lvpruning", nested, ratios=[0.6, 0.4, 0.2], tags={"mlflow.parentRunId": parent}
    )
    training = client.create_run(main, run_name="train").info.run_id
    client.log_metric(training, "loss", 1.0)
    client.set_terminated(training)
    failed = log(main, "failed", "lvpruning", setting_metrics(0.1, 100, 100), status="FAILED")
    return uri, client, ids, {"parent": parent, "training": training, "failed": failed}


def test_run_frontier_tags_runs_and_logs_the_frontier_run(store, tmp_path):
    uri, client, ids, others = store
    result = run_frontier(uri, ["frontier-main", "frontier-other"])

    assert {p.run_id for p in result.points} == set(ids.values())  # not the parent, training or FAILED runs
    assert [p.tflops for p in result.points] == sorted(p.tflops for p in result.points)
    fronts = {f.tag: f for f in result.fronts}
    assert list(fronts) == [
        "pareto/accuracy/mean",
        "pareto/accuracy/pope",
        "pareto/accuracy/toy",
        "pareto/latency/accuracy/mean",
    ]
    assert fronts["pareto/accuracy/mean"].excluded == 1  # the NaN run
    assert fronts["pareto/latency/accuracy/mean"].excluded == 2  # the NaN run, fastv without a latency

    expected = {
        "pareto/accuracy/mean": {"none", "paper", "lv_low"},
        "pareto/accuracy/toy": {"none", "paper", "lv_low", "nan"},  # its per-benchmark accuracies are numbers
        "pareto/accuracy/pope": {"none", "paper", "lv_low", "nan", "fastv"},
        "pareto/latency/accuracy/mean": {"none", "paper", "lv_low", "random"},
    }
    for name, run_id in ids.items():
        tags = client.get_run(run_id).data.tags
        held = {k for k, v in tags.items() if k.startswith("pareto/") and v == "true"}
        assert held == {tag for tag, names in expected.items() if name in names}, name
        assert set(k for k in tags if k.startswith("pareto/")) == held  # stale ones (gqa) deleted
    assert not any(k.startswith("pareto/") for k in client.get_run(others["parent"]).data.tags)

    run = client.get_run(result.run_id)
    assert run.info.run_name == "frontier" and run.info.status == "FINISHED" and run.data.tags[KIND_TAG] == "frontier"
    assert run.info.experiment_id == client.get_experiment_by_name("frontier-main").experiment_id
    assert json.loads(run.data.params["experiments"]) == ["frontier-main", "frontier-other"]
    assert run.data.params["points"] == str(len(ids)) and run.data.params["excluded"] == "1"
    assert {a.path for a in client.list_artifacts(result.run_id)} == set(ARTIFACTS)

    out = tmp_path / "downloaded"
    out.mkdir()
    local = {name: client.download_artifacts(result.run_id, name, str(out)) for name in ARTIFACTS}
    with Image.open(local["frontier.png"]) as image:
        image.verify()
    with Image.open(local["frontier.png"]) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 400
    html = open(local["frontier.html"]).read()
    assert "plotly.js v" in html and '<script src="http' not in html  # inlined: works offline
    assert all(run_id in html for run_id in ids.values())
    rows = list(csv.DictReader(open(local["frontier.csv"])))
    assert len(rows) == len(ids) and {r["run_id"] for r in rows} == set(ids.values())
    names = {run_id: name for name, run_id in ids.items()}
    for row in rows:
        for tag, members in expected.items():
            assert row[tag] == ("true" if names[row["run_id"]] in members else "false"), (tag, names[row["run_id"]])
    nan_row = next(r for r in rows if r["run_id"] == ids["nan"])
    assert nan_row["accuracy/mean"] == "" and nan_row["accuracy/toy"] == "40.0"

    lines = result.table.splitlines()
    assert lines[0].split() == [
        "method", "layers", "train", "infer", "tflops", "pope", "toy/color", "toy/count", "toy", "mean",
        "mean_95%_ci", "status", "run",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["lvpruning", "lvpruning", "none"]  # by TFLOPs
    assert lines[2].split()[3:5] == ["0.5-0.3-0.1", "3.7"] and lines[3].split()[1:4] == ["-", "-", "-"]


def test_run_frontier_again_ignores_its_earlier_run_and_changes_no_tag(store):
    uri, client, ids, _ = store
    first = run_frontier(uri, ["frontier-main", "frontier-other"], output_experiment="frontiers")
    client.set_tag(ids["random"], "pareto/accuracy/mean", "true")  # someone tagged it by hand since
    second = run_frontier(uri, ["frontier-main", "frontier-other", "frontiers"], output_experiment="frontiers")

    assert second.run_id != first.run_id and first.tags_set > 0
    assert {p.run_id for p in second.points} == {p.run_id for p in first.points}
    assert (second.tags_set, second.tags_removed) == (0, 1)
    assert "pareto/accuracy/mean" not in client.get_run(ids["random"]).data.tags
    frontiers = client.search_runs([client.get_experiment_by_name("frontiers").experiment_id])
    assert {r.info.run_id for r in frontiers} == {first.run_id, second.run_id}
    for a, b in zip(first.fronts, second.fronts):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_run_frontier_names_a_missing_experiment_and_an_empty_one(store):
    uri, client, _, _ = store
    with pytest.raises(ValueError, match="'nope'"):
        run_frontier(uri, ["frontier-main", "nope"])
    client.create_experiment("empty")
    with pytest.raises(ValueError, match=r"no evaluated settings .* \['empty'\]"):
        run_frontier(uri, ["empty"])


def test_every_method_has_its_own_colour_and_marker_and_points_their_error_bars(tmp_path):
    """Fifteen methods (the project's list and more): no two share a colour-marker pair (``none`` and ``vscan``
    once shared a grey star); the HTML carries each point's interval as an asymmetric error bar."""
    methods = ["none", "lvpruning", "random", "fastv", "visionzip", "vscan", "vflowopt", "transprune"]
    methods += ["adaptinfer", "star", "ptp", "lrs_vqa", "m1", "m2", "m3"]
    points = [
        Point(f"r{i}", "e", m, m, None, None, None, 1.0 + i, {"mean": 50.0 + i}, {}, {"mean": (48.0 + i, 53.0 + i)})
        for i, m in enumerate(methods)
    ]
    styles = method_styles(points)
    assert len(set(styles.values())) == len(methods) and styles["none"] == ("#7f7f7f", "*")
    fronts = compute_fronts(points)
    plot_html(points, fronts, tmp_path / "f.html")
    html = (tmp_path / "f.html").read_text()
    assert html.count('"error_y":{"array"') == len(methods)  # one error bar per method's trace
    plot_png(points, fronts, tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as image:
        assert image.format == "PNG"
