"""``ray job submit -- python jobs/train.py`` against the two-node cluster on loopback, whose second node sees none of
the driver's files: the toy world's base stage for a few steps, then the pruning stage on 2 DeepSpeed workers (one
per node), evaluation and MLflow (the team server), both jobs SUCCEEDED. What the second node reads (the trained toy
model, the images, the decision modules) reaches it through ``run.storage_path`` in S3."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.jobs import ray_jobs
from tests.jobs.conftest import BUCKET

EXPERIMENT = "train-job"


def submit(head, *args: str, timeout: float = 600, script: str = "jobs/train.py") -> tuple[str, str]:
    return ray_jobs.run(head, *args, timeout=timeout, script=script)


def common_args(tmp: Path, mlflow_uri: str) -> list[str]:
    return [
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={EXPERIMENT}",
        f"data.toy_root={tmp / 'toy'}",
        "data.toy_train_samples=48",  # 12+ conversations (one per scene): 3 steps of 4
        "data.toy_test_samples=8",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        f"run.storage_path=s3://{BUCKET}/train-job",
        "scaling.placement_strategy=SPREAD",  # one worker per node
        "eval.max_questions=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
        "eval.num_actors=1",
        f"eval.output_dir={tmp / 'eval'}",
    ]


@pytest.mark.timeout(1500)
def test_ray_job_submit_trains_base_then_decision_modules(head, mlflow_server):
    tmp = head.tmp
    common = common_args(tmp, mlflow_server)
    state, base_logs = submit(head, *common, "train.stage=base", "train.max_steps=2", "train.learning_rate=1e-3")
    assert state == "SUCCEEDED", base_logs[-4000:]
    assert (tmp / "toy" / "base_model" / "model.safetensors").is_file()
    assert (tmp / "toy" / "base_model" / "toy_world.json").is_file()  # stamped: the next job uses it

    state, logs = submit(head, *common, "train.max_steps=3", "train.learning_rate=1e-3")
    assert state == "SUCCEEDED", logs[-4000:]
    assert f"toy base model: {tmp / 'toy' / 'base_model'}" in logs
    assert "step 3/3" in logs and f"runs: {mlflow_server}/#/experiments/" in logs  # the UI link, in its runs view
    assert "?workflowType=machine_learning" in logs
    # each copied once, when first needed: the initial model and the images by the base job, then the base model it
    # trained (evaluated: the images are there already); the decision modules by the second job
    copied = r"^(\S+): copying (\S+) .* to s3://"
    toy = tmp / "toy"
    assert re.findall(copied, base_logs, re.M) == [
        ("model.name_or_path", str(toy / "init_model")),
        ("data.image_root", str(toy / "world" / "images")),
        ("model.name_or_path", str(toy / "base_model")),
    ]
    [(key, modules)] = re.findall(copied, logs, re.M)
    assert key == "eval.modules" and modules.endswith("/outputs/lvpruning-toy/pruning"), logs[-4000:]

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
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


@pytest.mark.timeout(1200)
def test_a_failed_evaluation_keeps_the_trained_modules_and_prints_the_evaluate_command(head, mlflow_server):
    """The evaluation after training reads a corrupt questions file: the job fails, but the decision modules are
    exported, the training run is FINISHED, and the printed ``jobs/evaluate.py`` command evaluates only."""
    tmp = head.tmp
    bad = tmp / "corrupt_questions.jsonl"
    bad.write_text('{"question_id": 0, "image": "0.png", "text": "What col')  # a file cut short mid-record
    broken = f"eval.data={{toy: {{questions: {bad}, image_root: {tmp}, annotations: {bad}}}}}"
    args = [*common_args(tmp, mlflow_server), "run.name=evalfails", f"eval.output_dir={tmp / 'eval-evalfails'}", broken]
    args += ["train.max_steps=1", "scaling.num_workers=1"]
    state, logs = submit(head, *args)
    assert state == "FAILED", logs[-4000:]
    assert "error: the evaluation failed" in logs and str(bad) in logs, logs[-4000:]
    modules = Path(re.search(r"decision modules: (\S+)", logs).group(1))
    assert (modules / "decision_modules.safetensors").is_file() and (modules / "lvpruning_config.json").is_file()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    training = client.search_runs([experiment], "tags.`lvpruning.run_name` = 'evalfails'")
    assert [r.info.status for r in training] == ["FINISHED"]
    # the bad file fails the latency measurement, before any setting's run is opened: none is left RUNNING
    assert [r.info.run_name for r in client.search_runs([experiment]) if r.info.status != "FINISHED"] == []

    command = shlex.split(logs.split("To evaluate only:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "jobs/evaluate.py"] and command[command.index("--modules") + 1] == str(modules)
    # the same command, with the questions repaired (the toy world's own again): evaluation only, no training
    state, logs = submit(head, *command[2:], "eval.data={}", script="jobs/evaluate.py")
    assert state == "SUCCEEDED", logs[-4000:]
    assert re.search(r"^lvpruning\s+0\.5-0\.3-0\.1", logs, re.M), logs[-4000:]
    assert len(client.search_runs([experiment], "tags.`lvpruning.run_name` = 'evalfails'")) == 1
