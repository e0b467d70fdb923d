"""Evaluate a LLaVA with and without LVPruning: accuracy, TFLOPs and latency per setting, one MLflow run each.

    python jobs/evaluate.py --config eval.yaml --model toy/base_model --modules outputs/toy/pruning \\
        eval.toy_world=toy/world eval.schedules='[[0.5,0.3,0.1],[0.3,0.1,0.05]]'
    ray job submit -- python jobs/evaluate.py --config eval_llava15_7b.yaml --modules /mnt/ckpt/decision_modules

A setting is a method (``none``, ``lvpruning`` or a training-free one of ``lvpruning.policies.POLICIES``:
``random``, ``fastv``, ``transprune``, ``adaptinfer``, ``star``) with a keep-ratio schedule; every setting runs on
every benchmark of ``eval.benchmarks`` (files in ``eval.data``, or ``eval.toy_world``) by Ray Data batch inference,
one pass per benchmark for all settings (the model loaded once per actor), resumable per setting, and the script
ends with a table of them all. MLflow: ``mlflow.tracking_uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.job import Job


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (default: the embedded defaults)")
    parser.add_argument("--model", help="the base model: HF id or directory (overrides model.name_or_path)")
    parser.add_argument("--modules", help="trained decision modules (overrides eval.modules)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.batch_size=8")
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> Job:
    """Read and resolve the config and check it against the model and its modules: a typo, an impossible value or a
    missing file fails here, before Ray starts."""
    from pipelines.config import load_config
    from pipelines.eval.evaluation import benchmarks_from_config, evaluated_model
    from pipelines.job import resolve

    job = resolve(load_config(args.config, args.overrides), model=args.model, modules=args.modules)
    model = evaluated_model(job)
    benchmarks_from_config(job.config)
    ev, config = job.config.eval, job.config
    print(f"evaluating {model.name_or_path} (modules: {model.modules}) on {list(ev.benchmarks)}")
    schedules = [list(s) for s in ev.schedules]
    print(f"methods {list(ev.methods)} x schedules {schedules}, answers under {config.answers_dir}")
    return job


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        job = setup(args)
    except (ValueError, OSError) as e:  # a bad config or a missing file: say so before any cluster work
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    from pipelines.cluster import connect_ray
    from pipelines.eval.evaluation import evaluate, format_table
    from pipelines.tracking import experiment_link

    try:  # a path that another node of the cluster would need but cannot read fails here, naming its key
        connect_ray(job)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(format_table(evaluate(job)))
        print(experiment_link(job.config))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
