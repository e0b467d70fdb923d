"""``jobs/evaluate.py`` end to end: a tiny model and questions, three settings, local Ray and MLflow on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.pipelines.test_inference import RATIOS, write_tiny_world

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "evaluate.py"


def run_job(cwd: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    return subprocess.run(
        [sys.executable, str(JOB), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(600)
def test_evaluate_job_logs_one_run_per_setting_and_prints_the_table(tmp_path):
    world = write_tiny_world(tmp_path / "world", n_good=4)
    config = {
        "model": {"name_or_path": str(world.model)},
        "pruning": {"layers": [0, 1], "train_ratios": list(RATIOS), "infer_ratios": list(RATIOS), "num_heads": 4},
        "mlflow": {"experiment": "evaluate-job"},
        "eval": {
            "benchmarks": ["toy"],
            "methods": ["none", "lvpruning", "random"],
            "schedules": [list(RATIOS)],
            "batch_size": 2,
            "max_new_tokens": 3,
            "num_actors": 2,
            "output_dir": str(tmp_path / "eval"),
            "data": {
                "toy": {
                    "questions": str(world.questions),
                    "image_root": str(world.images),
                    "annotations": str(world.truth),
                }
            },
        },
    }
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(config))
    args = ("--config", "evaluate.yaml", "--modules", str(world.modules), "eval.max_questions=5")
    done = run_job(tmp_path, *args, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = done.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "ratios"]) :]
    head = ["method", "ratios", "tflops", "toy", "mean", "mean_95%_ci", "prefill_ms", "e2e_ms"]
    assert table[0].split() == head
    assert [row.split()[:2] for row in table[1:4]] == [["none", "-"], ["lvpruning", "0.5-0.25"], ["random", "0.5-0.25"]]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("evaluate-job").experiment_id
    assert f"runs: http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning" in done.stdout
    runs = client.search_runs([experiment])
    by_name = {run.info.run_name: run for run in runs}
    assert set(by_name) == {"none", "lvpruning_0.5-0.25", "random_0.5-0.25"}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"ci_low/accuracy/toy", "ci_high/accuracy/mean"} <= set(run.data.metrics)
        assert {"accuracy/toy", "accuracy/mean", "tflops", "latency/prefill_ms", "latency/e2e_ms"} <= set(
            run.data.metrics
        )
        assert run.data.metrics["unanswered/toy"] == 1  # question 4 of the first 5 has a missing image
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())
        assert logged["eval"]["modules"] == str(world.modules) and logged["model"]["name_or_path"] == str(world.model)
    learned, baseline = by_name["lvpruning_0.5-0.25"].data, by_name["none"].data
    assert learned.params["method"] == "lvpruning" and json.loads(learned.params["infer_ratios"]) == list(RATIOS)
    assert json.loads(learned.params["layers"]) == [0, 1] and json.loads(learned.params["train_ratios"]) == list(RATIOS)
    assert "train_ratios" not in by_name["random_0.5-0.25"].data.params
    assert baseline.params["infer_ratios"] == "none" and "layers" not in baseline.params
    assert learned.metrics["tflops"] > by_name["random_0.5-0.25"].data.metrics["tflops"]  # + decision modules


def test_a_bad_config_fails_before_any_cluster_work(tmp_path):
    done = run_job(tmp_path, "eval.methods=[none,oracle]", timeout=120)
    assert done.returncode == 2
    assert "eval.methods" in done.stderr and "oracle" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()
