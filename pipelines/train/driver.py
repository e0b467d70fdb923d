"""Driver side of training: the ``TorchTrainer`` (Ray Train + DeepSpeed) built from the job config.

Re-running with the same ``run.name`` and ``run.storage_path`` resumes from the latest checkpoint; ``FailureConfig``
restarts failed workers from it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray.train
from ray.train import UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.config import JobConfig
from pipelines.stages import Stage
from pipelines.storage import ray_storage
from pipelines.train.data import InstructRows
from pipelines.train.worker import deepspeed_config, train_loop_per_worker


def planned_steps(cfg: JobConfig, num_records: int) -> int:
    """Optimizer steps for ``train.epochs`` over ``num_records`` usable records, capped by ``train.max_steps``."""
    per_epoch = num_records // cfg.train.global_batch_size
    if per_epoch == 0 and cfg.train.max_steps is None:
        raise ValueError(f"{num_records} records make no full global batch of {cfg.train.global_batch_size}")
    steps = math.ceil(per_epoch * cfg.train.epochs)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def fit(
    cfg: JobConfig,
    data: InstructRows,
    model_path: str,
    pad_token_id: int,
    total_steps: int,
    mlflow_tracking_uri: str,
    mlflow_run_id: str | None,
    callbacks: Sequence[UserCallback] = (),
    worker_env: Mapping[str, str] | None = None,
) -> ray.train.Result:
    """Train on ``data`` (the text stage's rows: each worker encodes its own stream of them, ``pipelines.train.order``)
    with ``scaling.num_workers`` DeepSpeed workers, a count or an elastic ``(min, max)``; returns Ray's result
    (checkpoint). ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep trial.
    ``worker_env``: environment variables for this run's workers only (e.g. ``LVPRUNING_SAMPLE_LOG``)."""
    use_gpu = cfg.scaling.use_gpu
    storage_path, filesystem = ray_storage(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "data": data,
            "deepspeed_config": deepspeed_config(cfg),
            "model_path": model_path,
            "pad_token_id": pad_token_id,
            "total_steps": total_steps,
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,  # an int, or (min, max): elastic
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
                **cfg.scaling.resources_per_worker,
            },
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.stage_run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures, controller_failure_limit=cfg.run.max_start_failures
            ),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
        ),
    )
    return trainer.fit()


def export(result: ray.train.Result, stage: Stage, destination: str | Path) -> Path:
    """Copy the stage's export in the final checkpoint (decision modules, or the whole toy model) to a local folder."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    destination = Path(destination)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / stage.export_dir, destination, dirs_exist_ok=True)
    return destination
