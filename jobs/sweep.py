"""Sweep where the decision modules go and how hard they prune (Ray Tune), then draw the frontier (MLflow).

    python jobs/sweep.py                                     # the toy world: jobs/configs/sweep_toy.yaml
    python jobs/sweep.py sweep.num_trials=4 run.name=my-sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep_llava15_7b.yaml

Each trial trains decision modules (Ray Train + DeepSpeed) at the layers, keep-ratio schedule and module shape
that Optuna suggests, and is evaluated at that schedule and a few shifted ones; the training-free baselines
(``sweep.baselines``) are evaluation-only trials of the same sweep. Re-running with the same ``run.name`` resumes:
finished trials are not redone. At the end, the Pareto frontier of ``accuracy/mean`` against ``tflops`` is
computed over the sweep's experiment (``jobs/frontier.py``), tagged, and logged as a ``frontier`` run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT = Path(__file__).parent / "configs" / "sweep_toy.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT), help="YAML job config with a sweep: section")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. sweep.num_trials=4")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # Imported once the command line is read: --help and a bad one need none of Ray, torch and DeepSpeed.
    from pipelines.cluster import connect_ray
    from pipelines.config import load_config
    from pipelines.sweep.objectives import objective_of
    from pipelines.sweep.tuner import check_sweep, run_sweep

    try:  # the config and every candidate of the search space, against the model: fails before any cluster work
        job = check_sweep(load_config(args.config, args.overrides))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    objective = objective_of(job)
    print(objective.plan(job))
    try:  # a path that another node of the cluster would need but cannot read fails here, naming its key
        connect_ray(job)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_sweep(job)
    print(f"\n{'resumed' if result.restored else 'ran'} {len(result.grid)} trials, {len(result.grid.errors)} failed")
    if result.interrupted:
        print(f"interrupted before every trial ended: run the same command again to resume {job.config.run.name}")
        return 130
    print(f"\n{objective.report(job, result.grid, result.run_id)}")
    return 1 if result.grid.errors else 0


if __name__ == "__main__":
    sys.exit(main())
