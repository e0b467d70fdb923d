"""Does MLflow's default SQLite store hold when several sweep trials log at once? N processes each create a run
and log ``--batches`` metric batches (two metrics per step) to one ``sqlite:///`` store at the same time; counts
errors (``database is locked``) and metric points lost, and the wall time.

    python benchmarks/mlflow_sqlite_writers.py --writers 2 4 8 16 --batches 300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric


def writer(uri: str, experiment_id: str, batches: int, out: mp.Queue) -> None:
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    errors = []
    for step in range(batches):
        now = int(time.time() * 1000)
        try:
            client.log_batch(run_id, metrics=[Metric("loss", float(step), now, step), Metric("lr", 0.1, now, step)])
        except Exception as e:  # what a trial would see: counted, not raised
            errors.append(repr(e)[:200])
    client.set_terminated(run_id)
    out.put((run_id, errors))


def measure(writers: int, batches: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("writers")
        out: mp.Queue = mp.Queue()
        procs = [mp.Process(target=writer, args=(uri, experiment_id, batches, out)) for _ in range(writers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
        wall = time.perf_counter() - start
        lost = sum(batches - len(client.get_metric_history(run_id, "loss")) for run_id, _ in results)
        errors = [e for _, errs in results for e in errs]
    return {"writers": writers, "batches": batches, "wall_s": round(wall, 1), "errors": len(errors), "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs"}))
    for n in args.writers:
        print(json.dumps(measure(n, args.batches)), flush=True)


if __name__ == "__main__":
    main()
