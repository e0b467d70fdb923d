"""``python jobs/sweep.py`` end to end, as a user runs it: a small sweep of tiny trials through real Ray Tune + Train
V2 + DeepSpeed on the shared two-node cluster (whose second node sees none of the driver's files: the base model
reaches the trials through ``run.storage_path`` in S3, each node writes its own toy world), logging to the team
``mlflow server`` (PostgreSQL, artifacts in S3). Its driver is killed (SIGKILL) mid-sweep and run again: the sweep
resumes, finished trials are not redone, no MLflow run is duplicated. Then the frontier run's plot is opened in the
MLflow UI in headless chromium (screenshot kept)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.browser import browser_binaries, open_artifact, screenshot_path
from tests.jobs.conftest import BUCKET

REPO = Path(__file__).resolve().parents[2]
SETTING = "tags.`lvpruning.kind` != 'sweep'"


def sweep_args(tmp: Path, name: str) -> list[str]:
    return [
        f"run.name={name}",
        f"mlflow.experiment={name}",
        f"data.toy_root={tmp / 'toy'}",
        "data.toy_train_samples=48",
        "data.toy_test_samples=8",
        "train.max_steps=4",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        f"run.storage_path=s3://{BUCKET}/sweeps",  # the second node sees nothing under tmp
        f"run.output_dir={tmp / 'outputs'}",
        f"eval.output_dir={tmp / 'eval'}",
        "eval.max_questions=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
        "sweep.num_trials=2",
        "sweep.concurrency=2",
        "sweep.grace_steps=3",
        "sweep.guard_min_trials=4",  # 2 searched trials: ASHA stops nothing here (tests/pipelines/test_sweep_ray.py)
        "sweep.infer_shifts=[-0.2]",
        "sweep.baselines.methods=[none,fastv]",
        "sweep.baselines.schedules=[[0.5,0.3,0.1]]",
        "sweep.baselines.at_own_layers=[]",
    ]


def start(head, mlflow_uri: str, args: list[str], log: Path) -> subprocess.Popen:
    env = head.env | {"RAY_ADDRESS": head.gcs, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "jobs/sweep.py", *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sweep_resumes_after_its_driver_is_killed_and_its_frontier_renders_in_the_ui(head, mlflow_server, tmp_path):
    browser_binaries()  # fail early, with the install command, when chromium is missing
    name = f"sweep-{uuid.uuid4().hex[:6]}"
    args, client = sweep_args(tmp_path, name), MlflowClient(mlflow_server)

    first = start(head, mlflow_server, args, tmp_path / "first.log")
    deadline, finished = time.monotonic() + 600, []
    while time.monotonic() < deadline and first.poll() is None:  # until a trial has finished, and a while more
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            finished = client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.`lvpruning.kind` = 'trial' and attributes.status = 'FINISHED'",
            )
            if finished:
                break
        time.sleep(2)
    assert finished and first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
    time.sleep(15)  # past Tune's next save of its experiment state (at most every 10 s or so)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = time.time() * 1000
    done_before = {r.info.run_id: r.info.end_time for r in finished}

    second = start(head, mlflow_server, args, tmp_path / "second.log")
    assert second.wait(timeout=1200) == 0, (tmp_path / "second.log").read_text()[-6000:]
    out = (tmp_path / "second.log").read_text()
    assert "resumed" in out and "Pareto frontier" in out

    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    kinds = Counter(r.data.tags.get("lvpruning.kind") for r in runs)
    assert kinds["sweep"] == 1 and kinds["frontier"] == 1
    trials = [r for r in runs if r.data.tags.get("lvpruning.kind") == "trial"]
    per_trial = Counter(r.data.tags["lvpruning.trial_id"] for r in trials)
    assert len(per_trial) == 4 and set(per_trial.values()) == {1}  # 2 baselines + 2 searched, one run each
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run_id, end_time in done_before.items():  # finished before the kill, not redone after it
        assert client.get_run(run_id).info.end_time == end_time < killed_at

    by_parent = Counter(
        (r.data.tags.get("mlflow.parentRunId"), r.info.run_name) for r in runs if "tflops" in r.data.metrics
    )
    assert set(by_parent.values()) == {1}  # every evaluated setting once
    methods = Counter(r.data.params["method"] for r in runs if "tflops" in r.data.metrics)
    assert methods == {"none": 1, "fastv": 1, "lvpruning": 4}  # each searched trial at its schedule and one shift
    sweep_id = next(r.info.run_id for r in runs if r.data.tags.get("lvpruning.kind") == "sweep")
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {sweep_id}
    searched = [r for r in trials if r.data.params.get("method") == "lvpruning"]
    assert all("lm_loss" in r.data.metrics and "layers" in r.data.params for r in searched)
    assert any(r.data.tags.get("pareto/accuracy/mean") == "true" for r in runs)

    frontier = next(r for r in runs if r.data.tags.get("lvpruning.kind") == "frontier")
    shot = screenshot_path("sweep-frontier-ui.png")
    facts = open_artifact(mlflow_server, experiment_id, frontier.info.run_id, "frontier.png", shot)
    print(f"screenshot: {shot} ({facts['url']})")
    assert facts["complete"] and facts["natural_width"] > 0 and facts["width"] > 200 and facts["height"] > 100
    assert os.path.getsize(shot) > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_label_free_calibration_sweep_reports_its_choice_against_the_labelled_optimum(head, mlflow_server, tmp_path):
    """``sweep.objective: hidden_similarity`` end to end: evaluation-only trials of VFlowOpt's parameters under a
    retention budget, each with its similarity on unlabeled training questions and its labelled accuracy."""
    name = f"calibrate-{uuid.uuid4().hex[:6]}"
    args = [
        "--config",
        "jobs/configs/calibrate_toy.yaml",
        *sweep_args(tmp_path, name)[:3],  # run name, experiment, toy root
        "data.toy_train_samples=48",
        "data.toy_test_samples=8",
        f"run.storage_path=s3://{BUCKET}/sweeps",
        f"eval.output_dir={tmp_path / 'eval'}",
        "eval.max_questions=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
        "sweep.num_trials=3",
        "sweep.calibration.num_questions=6",
        "sweep.calibration.batch_size=4",
    ]
    done = start(head, mlflow_server, args, tmp_path / "calibrate.log")
    assert done.wait(timeout=800) == 0, (tmp_path / "calibrate.log").read_text()[-6000:]
    out = (tmp_path / "calibrate.log").read_text()
    assert "label-free calibration of vflowopt" in out and "label-free choice: accuracy" in out

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("lvpruning.kind") == "trial"]
    assert len(trials) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for trial in trials:
        assert -1.0 <= trial.data.metrics["hidden_similarity"] <= 1.0
        assert abs(trial.data.metrics["retention"] - 0.33) <= 1 / 128 + 1e-9
        assert trial.data.metrics["calibration_questions"] == 6
        settings = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert len(settings) == 1 and "accuracy/mean" in settings[0].data.metrics
        assert "alpha" in settings[0].data.params["policy_params"]
    sweep = next(r for r in runs if r.data.tags.get("lvpruning.kind") == "sweep")
    assert {"calibration/chosen_accuracy", "calibration/best_accuracy"} <= set(sweep.data.metrics)
    assert "calibration.txt" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
