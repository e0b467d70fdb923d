"""Training one configuration, as one call: ``check_config`` (before any cluster work), then ``run_training``
(data -> Ray Train + DeepSpeed -> exported result, in its own MLflow run). ``jobs/train.py`` and every sweep trial
call these; evaluation is ``pipelines.eval.evaluation.evaluate``.

With the toy model, the toy world is written (or reused) under ``data.toy_root``, and the frozen base model is the
cached or shipped one, else trained first by the ``base`` stage (``jobs/configs/toy_base.yaml``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from ray.train import TrainingFailedError, UserCallback
from transformers import AutoProcessor

from lvpruning.presets import load_llava_config
from pipelines.cluster import lost_nodes
from pipelines.config import TOY, JobConfig, load_config
from pipelines.storage import join
from pipelines.toy.base import ToyWorld, prepare_toy_world
from pipelines.toy.model import toy_config
from pipelines.tracking import RUN_NAME_TAG, latest_training_run, mlflow_run, resumable_run_id, tracking_uri
from pipelines.train.data import build_instruct_dataset
from pipelines.train.driver import export, fit, planned_steps
from pipelines.train.worker import deepspeed_config

BASE_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy_base.yaml"


@dataclass(frozen=True)
class TrainingResult:
    config: JobConfig  # as trained: ``eval.toy_world`` set for the toy world, ready for ``evaluate``
    model_path: str  # the base model (stage pruning), or the trained toy model (stage base)
    modules: str | None  # the exported decision modules (stage pruning)
    run_id: str  # the MLflow training run


@dataclass(frozen=True)
class Inputs:
    """What a stage trains on: the config (toy world filled in), the model it starts from, the data."""

    config: JobConfig
    model_path: str
    train_json: str
    image_root: str
    world: ToyWorld | None = None


def check_config(cfg: JobConfig) -> JobConfig:
    """Check the config against the model's shape, ``train.init_from`` and the DeepSpeed JSON: fails before any
    cluster work. Returns it with ``train.init_from`` made absolute (Ray workers have their own working dir)."""
    if cfg.model.name_or_path != TOY and (cfg.data.train_json is None or cfg.data.image_root is None):
        raise ValueError("data.train_json and data.image_root are required for a real model")
    text = text_config(cfg)
    cfg.pruning.check_model(text.num_hidden_layers, text.hidden_size)
    if cfg.train.init_from is not None:
        init_from = Path(cfg.train.init_from).resolve()
        if not (init_from / "config.json").is_file():
            raise FileNotFoundError(f"train.init_from: {init_from} is not a saved model (no config.json)")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(init_from)})})
    deepspeed_config(cfg)  # the DeepSpeed JSON exists and suits the scaling (bf16 needs GPUs)
    return cfg


def text_config(cfg: JobConfig) -> Any:
    """The language model's config (layers, hidden size) of ``model.name_or_path``: read without the weights."""
    if cfg.model.name_or_path == TOY:
        return toy_config().text_config
    return load_llava_config(cfg.model.name_or_path).text_config


def prepare_inputs(cfg: JobConfig) -> Inputs:
    """The model and data of ``cfg``'s stage; for the toy world, written (or reused) now, its base model trained
    first when none is cached."""
    if cfg.model.name_or_path != TOY:
        return Inputs(cfg, cfg.model.name_or_path, cfg.data.train_json, cfg.data.image_root)
    d = cfg.data
    world = prepare_toy_world(
        d.toy_root,
        seed=d.seed,
        n_train=d.toy_train_samples,
        n_test=d.toy_test_samples,
        question_types=d.toy_question_types,
    )
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"toy_world": str(world.paths.root)})})
    if cfg.stage.exports_model:  # the base stage: from the initial toy model, or init_from
        model_path = world.continued_model(cfg.train.init_from) if cfg.train.init_from else world.init_model()
    else:
        model_path = toy_base_model(cfg, world)
    image_root = cfg.data.image_root or str(world.paths.image_folder)  # e.g. a copy of the images on s3://
    return Inputs(cfg, str(model_path), str(world.paths.train_json), image_root, world)


def toy_base_model(cfg: JobConfig, world: ToyWorld) -> str:
    """The frozen toy base model: the cached or shipped one, else trained now by the ``base`` stage."""
    trained = world.trained_base()
    if trained is not None:
        print(f"toy base model: {trained}")
        return str(trained)
    print(f"no trained toy base model under {world.base_model}: training it with {BASE_CONFIG}")
    overrides = [
        f"data.toy_root={cfg.data.toy_root}",
        f"run.storage_path={cfg.run.storage_path}",
        f"run.output_dir={cfg.run.output_dir}",
        f"mlflow.experiment={cfg.mlflow.experiment}",
        f"run.name={cfg.run.name}",
    ]
    if cfg.mlflow.tracking_uri:
        overrides.append(f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}")
    return run_training(load_config(BASE_CONFIG, overrides)).model_path


def run_training(
    cfg: JobConfig, *, tags: Mapping[str, str] | None = None, callbacks: Sequence[UserCallback] = ()
) -> TrainingResult:
    """Train ``cfg``'s stage in its own MLflow run (resumed when a previous attempt of this ``run.name`` left one
    unfinished; ``tags`` added, e.g. ``mlflow.parentRunId``), export it to ``<run.output_dir>/<run.name>/<stage>``
    and log the export as an artifact. ``callbacks`` go to Ray Train (a sweep's ``TuneReportCallback``)."""
    inputs = prepare_inputs(cfg)
    cfg, stage = inputs.config, inputs.config.stage
    processor = AutoProcessor.from_pretrained(inputs.model_path)
    dataset, ledger = build_instruct_dataset(
        inputs.train_json,
        inputs.image_root,
        processor,
        max_length=cfg.data.max_length,
        max_bad_fraction=cfg.data.max_bad_fraction,
        num_cpus=0.5,
    )
    steps = planned_steps(cfg, ledger.stats().pending)
    uri = tracking_uri(cfg)
    tags = {RUN_NAME_TAG: cfg.run.name, "stage": stage.name, **(tags or {})}
    params = {
        "method": stage.method,
        "total_steps": steps,
        "layers": list(cfg.pruning.layers),
        "train_ratios": list(cfg.pruning.train_ratios),
    }
    destination = inputs.world.base_model if stage.exports_model else export_path(cfg)
    with mlflow_run(cfg, f"{cfg.run.name}-{stage.name}", tags, params, resumable_run_id(cfg, uri)) as run:
        print(f"MLflow run {run.info.run_id} in experiment '{cfg.mlflow.experiment}' at {uri}")
        started_ms = int(time.time() * 1000)
        pad_token_id = processor.tokenizer.pad_token_id
        try:
            result = fit(cfg, dataset, inputs.model_path, pad_token_id, steps, uri, run.info.run_id, callbacks)
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
    if stage.exports_model:  # the toy world's base model, stamped (``ToyWorld.trained_base`` uses no other), and
        inputs.world.stamp_base_model()  # evaluated alone: there are no decision modules
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"methods": ("none",)})})
        return TrainingResult(cfg, str(exported), None, run.info.run_id)
    return TrainingResult(cfg, inputs.model_path, str(exported), run.info.run_id)


def export_path(cfg: JobConfig) -> Path:
    """Where ``run_training`` exports decision modules: ``<run.output_dir>/<run.name>/<stage>``, absolute: the
    evaluation's inference actors, which may run on other nodes, load them from there."""
    return (Path(cfg.run.output_dir) / cfg.run.name / cfg.stage.name).resolve()


def finished_training(cfg: JobConfig) -> TrainingResult | None:
    """The result of an earlier ``run_training`` of this run name that FINISHED and whose export is still there
    (a resumed sweep trial does not train twice); None otherwise."""
    run = latest_training_run(cfg, tracking_uri(cfg))
    exported = export_path(cfg)
    if cfg.stage.exports_model or run is None or run.info.status != "FINISHED" or not exported.is_dir():
        return None
    inputs = prepare_inputs(cfg)
    return TrainingResult(inputs.config, inputs.model_path, str(exported), run.info.run_id)
