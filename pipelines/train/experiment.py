"""Training one configuration, as one call: ``check_training`` (before any cluster work, on a job resolved by
``pipelines.job.resolve``), then ``run_training`` (data -> Ray Train + DeepSpeed -> exported result, in its own
MLflow run). ``jobs/train.py`` and every sweep trial
call these; evaluation is ``pipelines.eval.evaluation.evaluate``.

With the toy model, the toy world is written (or reused) under ``data.toy_root``, and the frozen base model is the
cached or shipped one, else trained first by the ``base`` stage (``jobs/configs/toy_base.yaml``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from ray.train import TrainingFailedError, UserCallback

from pipelines.cluster import for_every_node, lost_nodes
from pipelines.config import JobConfig, load_config
from pipelines.conversation import load_processor
from pipelines.job import Job, resolve
from pipelines.storage import join
from pipelines.toy.base import ToyWorld
from pipelines.tracking import RUN_NAME_TAG, latest_training_run, mlflow_run, resumable_run_id
from pipelines.train.data import prepare_instruct_rows
from pipelines.train.driver import export, fit, planned_steps
from pipelines.train.worker import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
BASE_CONFIGS = {  # by data.toy_variant
    "default": CONFIGS / "toy_base.yaml",
    "hires": CONFIGS / "toy_base_hires.yaml",
    "qwen": CONFIGS / "toy_base_qwen.yaml",
    "large": CONFIGS / "toy_base_hires.yaml",  # only when no toy LLaVA-NeXT is there to widen (ToyWorld.trained_base)
    "qwen_hires": CONFIGS / "toy_base_qwen_hires.yaml",
}


@dataclass(frozen=True)
class TrainingResult:
    model_path: str  # the base model (stage pruning), or the trained toy model (stage base)
    modules: str | None  # the exported decision modules (stage pruning) or Region Focus Module (region_focus)
    run_id: str  # the MLflow training run


def check_training(job: Job) -> None:
    """What training needs beyond :func:`pipelines.job.resolve`'s checks: data for a real model, a saved model to
    continue (``train.init_from``), the DeepSpeed JSON (bf16 needs GPUs). Fails before any cluster work."""
    cfg = job.config
    if not job.is_toy and (cfg.data.train_json is None or cfg.data.image_root is None):
        raise ValueError("data.train_json and data.image_root are required for a real model")
    if cfg.train.init_from is not None and not (Path(cfg.train.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"train.init_from: {cfg.train.init_from} is not a saved model (no config.json)")
    deepspeed_config(cfg)


def prepare_model(job: Job) -> str:
    """The model ``job``'s stage starts from; for the toy world, written (or reused) now, and its base model trained
    first when none is cached (the ``base`` stage starts from the initial toy model, or ``train.init_from``)."""
    cfg = job.config
    if not job.is_toy:
        return cfg.model.name_or_path
    world = toy_world(job)
    if cfg.stage.exports_model:
        return str(world.continued_model(cfg.train.init_from) if cfg.train.init_from else world.init_model())
    if job.base is not None:  # a sweep trial: the base model its driver prepared
        return job.base
    trained = world.trained_base()
    if trained is not None:
        print(f"toy base model: {trained}")
        return str(trained)
    base_config = BASE_CONFIGS[cfg.data.toy_variant]
    print(f"no trained toy base model under {world.base_model}: training it with {base_config}")
    overrides = [
        f"data.toy_root={cfg.data.toy_root}",
        f"data.toy_variant={cfg.data.toy_variant}",
        f"run.storage_path={cfg.run.storage_path}",
        f"run.output_dir={cfg.run.output_dir}",
        f"mlflow.experiment={cfg.mlflow.experiment}",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        f"run.name={cfg.run.name}",
    ]
    return run_training(resolve(load_config(base_config, overrides))).model_path


def toy_world(job: Job) -> ToyWorld:
    """The job's toy world, written now unless it is already there."""
    return job.toy_world.written(job.config.data.toy_train_samples, job.config.data.toy_test_samples)


def run_training(
    job: Job, *, tags: Mapping[str, str] | None = None, callbacks: Sequence[UserCallback] = ()
) -> TrainingResult:
    """Train ``job``'s stage in its own MLflow run (resumed when a previous attempt of this ``run.name`` left one
    unfinished; ``tags`` added, e.g. ``mlflow.parentRunId``), export it to ``<run.output_dir>/<run.name>/<stage>``
    and log the export as an artifact. ``callbacks`` go to Ray Train (a sweep's ``TuneReportCallback``)."""
    cfg, stage = job.config, job.config.stage
    model_path = prepare_model(job)
    processor = load_processor(model_path, cfg.model.processor.options())
    # What the workers and the encode tasks read, where every node reads it (copied to run.storage_path if need be).
    remote_model = for_every_node(model_path, "model.name_or_path", cfg.run.storage_path)
    data, ledger = prepare_instruct_rows(
        cfg.data.train_json,
        for_every_node(cfg.data.image_root, "data.image_root", cfg.run.storage_path),
        processor,
        max_length=cfg.data.max_length,
        max_bad_fraction=cfg.data.max_bad_fraction,
        num_cpus=0.5,
    )
    steps = planned_steps(cfg, len(data))
    uri = cfg.mlflow.tracking_uri
    tags = {RUN_NAME_TAG: cfg.run.name, "stage": stage.name, **(tags or {})}
    params = {"method": stage.method, "total_steps": steps, **stage.params(cfg)}
    world = toy_world(job) if stage.exports_model else None
    destination = world.base_model if world is not None else export_path(cfg)
    with mlflow_run(cfg, f"{cfg.run.name}-{stage.name}", tags, params, resumable_run_id(cfg, uri)) as run:
        print(f"MLflow run {run.info.run_id} in experiment '{cfg.mlflow.experiment}' at {uri}")
        started_ms = int(time.time() * 1000)
        pad_token_id = processor.tokenizer.pad_token_id
        try:
            result = fit(cfg, data, remote_model, pad_token_id, steps, uri, run.info.run_id, callbacks)
        except TrainingFailedError as error:
            lost = lost_nodes(started_ms)
            if lost:
                raise RuntimeError(
                    f"training failed after losing {len(lost)} node(s): {'; '.join(lost)}. Its checkpoints are "
                    f"kept under {join(cfg.run.storage_path, cfg.stage_run_name)}: re-run with run.name={cfg.run.name} "
                    "to resume from the last one"
                ) from error
            raise
        stats = ledger.check()
        mlflow.log_metrics(
            {f"skipped/{reason}": n for reason, n in stats.counts.items()} | {"records/kept": stats.kept}
        )
        print(f"data: {stats.summary()}")
        exported = export(result, stage, destination)
        mlflow.log_artifacts(str(exported), artifact_path=exported.name)
        print(f"exported {exported} (also an MLflow artifact)")
    if world is not None:  # the toy world's base model, stamped: ``ToyWorld.trained_base`` uses no other
        world.stamp_base_model()
        return TrainingResult(str(exported), None, run.info.run_id)
    return TrainingResult(model_path, str(exported), run.info.run_id)


def export_path(cfg: JobConfig) -> Path:
    """Where ``run_training`` exports decision modules (or a Region Focus Module):
    ``<run.output_dir>/<run.name>/<stage>`` (absolute, as ``run.output_dir`` is resolved)."""
    return Path(cfg.run.output_dir) / cfg.run.name / cfg.stage.name


def finished_training(job: Job) -> TrainingResult | None:
    """The result of an earlier ``run_training`` of this run name that FINISHED and whose export is still there
    (a resumed sweep trial does not train twice); None otherwise."""
    cfg = job.config
    run = latest_training_run(cfg, cfg.mlflow.tracking_uri)
    exported = export_path(cfg)
    if cfg.stage.exports_model or run is None or run.info.status != "FINISHED" or not exported.is_dir():
        return None
    return TrainingResult(job.base_model, str(exported), run.info.run_id)
