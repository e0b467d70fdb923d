"""``ray job submit -- python jobs/train.py`` against a local head on loopback: the toy world's base stage for a
few steps, then the pruning stage on 2 DeepSpeed workers, evaluation and MLflow, both jobs SUCCEEDED."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local Ray head (token authentication as Ray sets it up), dashboard and job server on 127.0.0.1.

    Teardown runs ``ray stop --force``, which stops every Ray cluster on the machine: run this suite where no
    other Ray cluster is needed (as CI does)."""
    tmp = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this environment's
    env["RAY_AUTH_MODE"] = "token"
    dashboard = free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={tmp / 'ray'}",
    ]
    subprocess.run(start, check=True, env=env, cwd=tmp, capture_output=True, timeout=180)
    yield f"http://127.0.0.1:{dashboard}", env, tmp
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(head, *args: str) -> subprocess.CompletedProcess:
    address, env, tmp = head
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}}
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        "python",
        "jobs/train.py",
        *args,
    ]
    for _ in range(30):  # the job agent may come up a little after the dashboard
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


@pytest.mark.timeout(1500)
def test_ray_job_submit_trains_base_then_decision_modules(head):
    _, _, tmp = head
    common = [
        f"data.toy_root={tmp / 'toy'}",
        "data.toy_train_samples=48",  # 12 conversations: 3 steps of 4
        "data.toy_test_samples=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        f"run.storage_path={tmp / 'runs'}",
        "eval.max_questions=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
        "eval.num_actors=1",
        f"eval.output_dir={tmp / 'eval'}",
    ]
    base = submit(head, *common, "train.stage=base", "train.max_steps=2", "train.learning_rate=1e-3")
    assert base.returncode == 0 and "succeeded" in base.stdout, (base.stdout + base.stderr)[-4000:]
    assert (tmp / "toy" / "base_model" / "model.safetensors").is_file()

    pruning = submit(head, *common, "train.max_steps=3", "train.learning_rate=1e-3")
    out = pruning.stdout + pruning.stderr
    assert pruning.returncode == 0 and "succeeded" in pruning.stdout, out[-4000:]
    assert "step 3/3" in out and "mlflow ui --backend-store-uri" in out

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lvpruning").experiment_id])
    by_stage = {r.data.tags.get("stage"): r for r in runs if "stage" in r.data.tags}
    assert by_stage["base"].info.status == by_stage["pruning"].info.status == "FINISHED"
    train_run = by_stage["pruning"]
    assert train_run.data.params["config.pruning.layers"] == "[0, 1, 2]"
    assert {"loss", "lm_loss", "ratio_loss", "keep_fraction/stage0", "lr", "samples_per_second"} <= set(
        train_run.data.metrics
    )
    assert "skipped/missing_image" in train_run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(train_run.info.run_id, "pruning")]
    assert "pruning/decision_modules.safetensors" in artifacts
    methods = {r.data.params.get("method") for r in runs if "infer_ratios" in r.data.params}
    assert methods == {"none", "lvpruning", "random"}
