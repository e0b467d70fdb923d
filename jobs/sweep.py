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
    from pipelines.frontier.run import run_frontier
    from pipelines.sweep.calibration import report_calibration
    from pipelines.sweep.tuner import check_sweep, run_sweep
    from pipelines.tracking import redact, ui_hint

    try:  # the config and every candidate of the search space, against the model: fails before any cluster work
        cfg = check_sweep(load_config(args.config, args.overrides))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = cfg.sweep
    if s.objective == "hidden_similarity":
        c = s.calibration
        print(
            f"calibration {cfg.run.name}: {s.num_trials} trials of {c.method} at retention {c.budget}, "
            f"{c.num_questions} unlabeled questions each, {s.concurrency} at a time"
        )
    else:
        print(
            f"sweep {cfg.run.name}: {s.num_trials} searched trials + {len(s.baselines.methods)} baselines "
            f"({', '.join(s.baselines.methods)}), {s.concurrency} at a time, {cfg.scaling.num_workers} training "
            f"worker(s) each; results under {cfg.run.storage_path}/{cfg.run.name}"
        )
    connect_ray()
    result = run_sweep(cfg)
    print(f"\n{'resumed' if result.restored else 'ran'} {len(result.grid)} trials, {len(result.grid.errors)} failed")
    if result.interrupted:
        print(f"interrupted before every trial ended: run the same command again to resume {cfg.run.name}")
        return 130
    if s.objective == "hidden_similarity":
        print(f"\nlabel-free calibration of {s.calibration.method}, best similarity first:\n")
        print(report_calibration(cfg, result.grid, result.run_id))
        return 1 if result.grid.errors else 0
    frontier = run_frontier(cfg.mlflow.tracking_uri, [cfg.mlflow.experiment])
    print(f"\nPareto frontier (accuracy/mean against TFLOPs), frontier run {frontier.run_id}:\n{frontier.table}")
    uri = redact(cfg.mlflow.tracking_uri)  # shown without the user:password@ a server URL may carry
    print(f"\nMLflow: experiment '{cfg.mlflow.experiment}' at {uri}\n  {ui_hint(uri)}")
    return 1 if result.grid.errors else 0


if __name__ == "__main__":
    sys.exit(main())
