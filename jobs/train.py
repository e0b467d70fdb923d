"""Train LVPruning decision modules with Ray Train + DeepSpeed, log to MLflow, then evaluate.

    python jobs/train.py                                       # the toy world, on this machine
    python jobs/train.py train.max_steps=50 scaling.num_workers=1
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/llava15_7b.yaml

Stage ``pruning`` (the paper's recipe) trains only the decision modules of a frozen base model. With the toy model,
the base model is itself trained first by this job's ``base`` stage (``jobs/configs/toy_base.yaml``), cached under
``data.toy_root`` and reused. Re-running with the same ``run.name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
from transformers import AutoConfig, AutoProcessor

from pipelines.cluster import connect_ray
from pipelines.config import TOY, JobConfig, load_config
from pipelines.evaluation import evaluate, evaluate_command, format_table
from pipelines.instruct_data import build_instruct_dataset
from pipelines.toy.base import ToyWorld, prepare_toy_world
from pipelines.toy.model import toy_config
from pipelines.tracking import RUN_NAME_TAG, mlflow_run, resumable_run_id, tracking_uri, ui_hint
from pipelines.train_loop import deepspeed_config
from pipelines.training import export, fit, planned_steps

BASE_CONFIG = Path(__file__).parent / "configs" / "toy_base.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (default: the toy world)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> JobConfig:
    """Read and validate the config, and check it against the model's shape: fails before any cluster work."""
    cfg = load_config(args.config, args.overrides)
    if cfg.model.name_or_path == TOY:
        text = toy_config().text_config
    else:
        if cfg.data.train_json is None or cfg.data.image_root is None:
            raise ValueError("data.train_json and data.image_root are required for a real model")
        text = AutoConfig.from_pretrained(cfg.model.name_or_path).text_config  # config only, no weights
    cfg.pruning.check_model(text.num_hidden_layers, text.hidden_size)
    if cfg.train.init_from is not None:  # made absolute: the Ray workers load it from their own working directory
        init_from = Path(cfg.train.init_from).resolve()
        if not (init_from / "config.json").is_file():
            raise FileNotFoundError(f"train.init_from: {init_from} is not a saved model (no config.json)")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(init_from)})})
    deepspeed_config(cfg)  # the DeepSpeed JSON exists and suits the scaling (bf16 needs GPUs)
    print(
        f"stage {cfg.train.stage}: {cfg.model.name_or_path}, {cfg.scaling.num_workers} workers, "
        f"global batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {cfg.scaling.num_workers} "
        f"workers x {cfg.gradient_accumulation_steps} accumulation steps"
    )
    return cfg


def train_stage(cfg: JobConfig, model_path: str, train_json: str, image_root: str, export_to: Path) -> Path:
    """One training run in its own MLflow run: data -> Ray Train + DeepSpeed -> exported result."""
    processor = AutoProcessor.from_pretrained(model_path)
    dataset, ledger = build_instruct_dataset(
        train_json,
        image_root,
        processor,
        max_length=cfg.data.max_length,
        max_bad_fraction=cfg.data.max_bad_fraction,
        num_cpus=0.5,
    )
    steps = planned_steps(cfg, ledger.stats().pending)
    uri = tracking_uri(cfg)
    tags = {RUN_NAME_TAG: cfg.run.name, "stage": cfg.train.stage}
    params = {
        "method": "lvpruning" if cfg.train.stage == "pruning" else "none",
        "total_steps": steps,
        "layers": list(cfg.pruning.layers),
        "train_ratios": list(cfg.pruning.train_ratios),
    }
    with mlflow_run(cfg, f"{cfg.run.name}-{cfg.train.stage}", tags, params, resumable_run_id(cfg, uri)) as run:
        print(f"MLflow run {run.info.run_id} in experiment '{cfg.mlflow.experiment}' at {uri}")
        result = fit(cfg, dataset, model_path, processor.tokenizer.pad_token_id, steps, uri, run.info.run_id)
        if result.error:
            raise result.error
        stats = ledger.check()
        mlflow.log_metrics(
            {f"skipped/{reason}": n for reason, n in stats.counts.items()} | {"records/kept": stats.kept}
        )
        print(f"data: {stats.summary()}")
        exported = export(result, cfg.train.stage, export_to)
        mlflow.log_artifacts(str(exported), artifact_path=exported.name)
        print(f"exported {exported} (also an MLflow artifact)")
    return exported


def toy_base_model(cfg: JobConfig, world: ToyWorld) -> str:
    """The toy base model: the cached or shipped one, else trained now by this job's ``base`` stage."""
    trained = world.trained_base()
    if trained is not None:
        print(f"toy base model: {trained}")
        return str(trained)
    print(f"no trained toy base model under {world.base_model}: training it with {BASE_CONFIG}")
    base = load_config(
        BASE_CONFIG,
        [
            f"data.toy_root={cfg.data.toy_root}",
            f"run.storage_path={cfg.run.storage_path}",
            f"mlflow.experiment={cfg.mlflow.experiment}",
            f"run.name={cfg.run.name}",
        ]
        + ([f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"] if cfg.mlflow.tracking_uri else []),
    )
    return str(train_toy_base(base, world))


def train_toy_base(cfg: JobConfig, world: ToyWorld) -> Path:
    """The ``base`` stage on the toy world: the initial toy model (or ``train.init_from``) trained into
    ``<toy_root>/base_model``, stamped with the world it learnt (``ToyWorld.trained_base`` uses no other)."""
    start = world.continued_model(cfg.train.init_from) if cfg.train.init_from else world.init_model()
    data = str(world.paths.train_json), str(world.paths.image_folder)
    exported = train_stage(cfg, str(start), *data, world.base_model)
    world.stamp_base_model()
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        cfg = setup(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect_ray()
    if cfg.model.name_or_path == TOY:
        world = prepare_toy_world(cfg.data)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"toy_world": str(world.paths.root)})})
    if cfg.train.stage == "base":  # the toy world only (JobConfig checks it)
        model_path, modules = str(train_toy_base(cfg, world)), None
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"methods": ("none",)})})
    else:
        if cfg.model.name_or_path == TOY:
            train_json, image_root = str(world.paths.train_json), str(world.paths.image_folder)
            model_path = toy_base_model(cfg, world)
        else:
            train_json, image_root, model_path = cfg.data.train_json, cfg.data.image_root, cfg.model.name_or_path
        output = Path("outputs") / cfg.run.name / cfg.train.stage
        modules = str(train_stage(cfg, model_path, train_json, image_root, output))
    uri = tracking_uri(cfg)
    if not args.no_eval:
        try:
            print(format_table(evaluate(cfg, model_path=model_path, modules=modules)))
        except Exception as e:  # the training is done and exported: say where, and how to evaluate only
            logging.getLogger(__name__).exception("evaluation failed")
            trained = f"decision modules: {Path(modules).resolve()}" if modules else f"base model: {model_path}"
            print(
                f"\nerror: the evaluation failed ({type(e).__name__}: {e}).\nThe training finished and is kept: "
                f"{trained} (MLflow run FINISHED, experiment '{cfg.mlflow.experiment}' at {uri}).\n"
                f"To evaluate only:\n  {evaluate_command(cfg, args.config, args.overrides, model_path, modules)}",
                file=sys.stderr,
            )
            return 1
    print(f"\nMLflow: experiment '{cfg.mlflow.experiment}' at {uri}\n  {ui_hint(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
