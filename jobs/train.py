"""Train LVPruning decision modules with Ray Train + DeepSpeed, log to MLflow, then evaluate.

    python jobs/train.py                                       # the toy world, on this machine
    python jobs/train.py train.max_steps=50 scaling.num_workers=1
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/llava15_7b.yaml

Stage ``pruning`` (the paper's recipe) trains only the decision modules of a frozen base model. With the toy model,
the base model is itself trained first by this job's ``base`` stage (``jobs/configs/toy_base.yaml``), cached under
``data.toy_root`` and reused. Stage ``region_focus`` trains LRS-VQA's Region Focus Module beside a frozen base
model (``jobs/configs/toy_region_focus.yaml``), then evaluates the base model and its pyramid with the module
(``eval.lrs_vqa``). Re-running with the same ``run.name`` resumes from
the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (default: the toy world)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # Imported once the command line is read: --help and a bad one need none of Ray, torch and DeepSpeed.
    from pipelines.cluster import connect_ray
    from pipelines.config import load_config
    from pipelines.eval.evaluation import evaluate, evaluate_command, format_table
    from pipelines.job import resolve
    from pipelines.tracking import experiment_link
    from pipelines.train.experiment import check_training, run_training

    try:  # the config, resolved and checked against the model's shape: a bad one fails here, before any cluster work
        job = resolve(load_config(args.config, args.overrides))
        check_training(job)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, uri = job.config, job.config.mlflow.tracking_uri
    splits = ", ".join(
        f"{cfg.train.micro_batch_size} x {n} workers x {cfg.gradient_accumulation_steps(n)} accumulation steps"
        for n in cfg.scaling.worker_counts
    )
    print(
        f"stage {cfg.train.stage}: {cfg.model.name_or_path}, {cfg.scaling.num_workers} workers, "
        f"global batch {cfg.train.global_batch_size} = {splits}"
    )
    try:  # a path that another node of the cluster would need but cannot read fails here, naming its key
        connect_ray(job)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = run_training(job)
    if not args.no_eval:
        try:
            print(format_table(evaluate(job, model_path=trained.model_path, modules=trained.modules)))
        except Exception as e:  # the training is done and exported: say where, and how to evaluate only
            logging.getLogger(__name__).exception("evaluation failed")
            modules, model = trained.modules, trained.model_path
            kept = f"decision modules: {Path(modules).resolve()}" if modules else f"base model: {model}"
            print(
                f"\nerror: the evaluation failed ({type(e).__name__}: {e}).\nThe training finished and is kept: "
                f"{kept} (MLflow run FINISHED, experiment '{cfg.mlflow.experiment}' at {uri}).\nTo evaluate only:\n"
                f"  {evaluate_command(cfg, args.config, args.overrides, model, modules)}",
                file=sys.stderr,
            )
            return 1
    print(f"\n{experiment_link(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
