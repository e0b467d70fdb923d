"""The accuracy-cost Pareto frontier of the evaluated settings in MLflow experiments: tags and a ``frontier`` run.

    python jobs/frontier.py --experiments lvpruning
    python jobs/frontier.py --experiments lvpruning sweep-layers --tracking-uri http://mlflow:5000 \\
        --output-experiment frontiers

Reads every FINISHED run with ``tflops`` and ``accuracy/mean`` (``jobs/evaluate.py``'s, a sweep's), tags the runs on
the frontiers ``pareto/accuracy/mean = true`` (and per benchmark, and ``pareto/latency/accuracy/mean``) and removes
stale tags, logs a new ``frontier`` run (PNG, HTML, CSV) and prints the frontier's table. Rerun it after each
evaluation. MLflow: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.frontier.run import FrontierResult


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", nargs="+", required=True, help="MLflow experiments to read the runs of")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    parser.add_argument("--output-experiment", help="where the frontier run goes (default: the first experiment)")
    return parser.parse_args(argv)


def report(result: FrontierResult, uri: str) -> None:
    """The table, what was left out, the tags changed, and where to look."""
    from pipelines.tracking import ui_hint

    main = result.fronts[0]
    print(f"{int(main.mask.sum())} of {len(result.points)} settings on the frontier of {main.accuracy} vs {main.cost}:")
    print(result.table)
    for front in result.fronts:
        if front.excluded:
            print(f"{front.excluded} runs without {front.accuracy} or {front.cost} excluded from {front.tag}")
    print(f"tags: {result.tags_set} set, {result.tags_removed} removed")
    print(
        f"frontier run {result.run_id} (experiment {result.experiment_id}): frontier.png, frontier.html, frontier.csv"
    )
    print(ui_hint(uri, result.experiment_id, result.run_id))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported once the command line is read: --help and a bad one need none of MLflow.
    from pipelines.frontier.run import run_frontier
    from pipelines.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    print(f"reading experiments {args.experiments} from {uri}")
    try:
        result = run_frontier(uri, args.experiments, args.output_experiment)
    except ValueError as e:  # a missing experiment, or no evaluated settings in them
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
