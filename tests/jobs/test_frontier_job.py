"""``jobs/frontier.py`` as a command: the table and the frontier run on SQLite; exit 2 naming what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.pipelines.test_frontier import log_setting, setting_metrics

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "frontier.py"


def run_job(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, str(JOB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_frontier_job_prints_the_table_and_the_frontier_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("job", artifact_location=str(tmp_path / "artifacts"))
    log_setting(client, experiment, "none", "none", setting_metrics(8.6, 80, 86, prefill_ms=90))
    paper = log_setting(client, experiment, "lv", "lvpruning", setting_metrics(3.7, 77, 83), ratios=[0.5, 0.3, 0.1])

    done = run_job(tmp_path, "--experiments", "job", "--tracking-uri", "sqlite:///mlflow.db")  # relative: made absolute
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "2 of 2 settings on the frontier of accuracy/mean vs tflops" in out
    assert "1 runs without accuracy/mean or latency/prefill_ms excluded from pareto/latency/accuracy/mean" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out
    (frontier,) = client.search_runs([experiment], filter_string="tags.`lvpruning.kind` = 'frontier'")
    assert f"frontier run {frontier.info.run_id}" in out
    link = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{frontier.info.run_id}?workflowType=machine_learning"
    assert f"run: {link}" in out.splitlines()[-1]  # the frontier run, in MLflow's model-training view
    rows = out[out.index("method") :].splitlines()[1:3]
    assert [r.split()[0] for r in rows] == ["lvpruning", "none"] and rows[0].split()[-1] == paper[:8]


def test_frontier_job_exits_2_naming_a_missing_experiment_or_an_empty_one(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    done = run_job(tmp_path, "--experiments", "empty", "no-such-experiment", "--tracking-uri", uri)
    assert done.returncode == 2 and "no MLflow experiment named 'no-such-experiment'" in done.stderr

    done = run_job(tmp_path, "--experiments", "empty", "--tracking-uri", uri)
    assert done.returncode == 2 and "no evaluated settings" in done.stderr and "['empty']" in done.stderr
