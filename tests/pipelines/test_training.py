"""Ray Train + DeepSpeed on 2 CPU workers: a failure injected mid-training restarts from the last checkpoint,
which lives on an S3-compatible server (moto), and the run finishes with the right number of steps. Workers of one
node resuming together each read their own download of the checkpoint."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import boto3
import pytest
import ray
from mlflow import MlflowClient
from transformers import LlavaForConditionalGeneration

import pipelines.train.worker
from lvpruning import load_decision_modules
from pipelines.config import load_config
from pipelines.storage import ray_storage
from pipelines.toy.model import build_toy_model, save_toy_model, toy_processor
from pipelines.toy.writer import write_toy_world
from pipelines.train.data import prepare_instruct_rows
from pipelines.train.driver import export, fit, planned_steps
from pipelines.train.worker import FAIL_AT_STEP_ENV, TrainState, load_checkpoint


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    world = write_toy_world(root / "world", seed=0, n_train=80, n_test=4)  # 20+ conversations
    model_path = save_toy_model(root / "init", build_toy_model(), toy_processor())
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="runs")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {FAIL_AT_STEP_ENV: "3"}})
    yield root, world, model_path
    ray.shutdown()


@pytest.mark.timeout(900)
def test_injected_failure_resumes_from_the_s3_checkpoint(cluster, s3_endpoint):
    root, world, model_path = cluster
    cfg = load_config(
        None,
        [
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.max_steps=4",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.learning_rate=1e-3",
            "run.name=resume",
            "run.storage_path=s3://runs/lvpruning",
            "run.max_failures=1",
        ],
    )
    processor = toy_processor()
    data, _ = prepare_instruct_rows(str(world.train_json), str(world.image_folder), processor, num_cpus=0.5)
    steps = planned_steps(cfg, len(data))
    assert steps == 4
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id

    result = fit(cfg, data, str(model_path), processor.tokenizer.pad_token_id, steps, uri, run_id)

    assert result.error is None
    assert result.metrics["step"] == 4
    # Attempt 1 logs steps 1-2, checkpoints at 2 and dies at 3; attempt 2 resumes at 2 and logs 3-4.
    # A restart from step 0 would log steps 1 and 2 twice.
    logged = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert logged == [1, 2, 3, 4]
    fractions = client.get_metric_history(run_id, "keep_fraction/stage0")
    assert all(0.0 <= m.value <= 1.0 for m in fractions)

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="runs", Prefix="lvpruning/resume")["Contents"]]
    assert any(k.endswith("decision_modules/decision_modules.safetensors") for k in keys)
    assert any("deepspeed" in k for k in keys)

    # Re-running with the same run name resumes from the latest checkpoint (step 4) and goes on to step 6.
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})})
    again = fit(longer, data, str(model_path), processor.tokenizer.pad_token_id, 6, uri, run_id)
    assert again.error is None and again.metrics["step"] == 6
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]

    exported = export(again, cfg.stage, root / "exported")
    pruner = load_decision_modules(LlavaForConditionalGeneration.from_pretrained(model_path), exported)
    assert pruner.config.layers == cfg.pruning.layers


def test_a_worker_resuming_later_does_not_rewrite_the_files_another_is_reading(s3_endpoint):
    """Ray's ``Checkpoint.as_directory`` shares one download folder per node: a worker arriving after the first
    download has finished downloads again into it while the first reads (seen as a truncated DeepSpeed file)."""
    bucket = "race"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="ckpt/deepspeed/mp_rank_00_model_states.pt", Body=b"x" * 1024)
    path, filesystem = ray_storage(f"s3://{bucket}/ckpt")
    checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    seen: list[tuple[Path, int]] = []

    def read(directory: str, engine) -> TrainState:
        file = Path(directory) / "deepspeed" / "mp_rank_00_model_states.pt"
        seen.append((file, file.stat().st_mtime_ns))
        if len(seen) == 1:  # the second worker resumes while the first still reads
            load_checkpoint(engine)
            assert file.stat().st_mtime_ns == seen[0][1], "the files being read were downloaded again"
        assert file.read_bytes() == b"x" * 1024
        return TrainState(step=2)

    with (
        mock.patch.object(ray.train, "get_checkpoint", return_value=checkpoint),
        mock.patch.object(pipelines.train.worker, "read_checkpoint", read),
    ):
        assert load_checkpoint(engine=None) == TrainState(step=2)
    assert len(seen) == 2 and seen[0][0] != seen[1][0]
