"""What the sweep relies on in Ray Tune + Train V2 and MLflow, on a real local cluster of 2 CPUs:

- a trial that Tune stops early frees the placement group of its Train run, so the next trial can start (Ray
  issue #54305: a stopped Train V2 run could keep it, which deadlocks a small cluster);
- trials logging to one SQLite MLflow store at the same time lose no metric point and see no ``database is
  locked`` (the sweep's default store; ``benchmarks/SWEEP.md`` has the measurement with more writers).
"""

from __future__ import annotations

import time

import pytest
import ray
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group_table


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def endless_training(config: dict) -> None:
    for step in range(1, 10_000):
        ray.train.report({"step": step, "lm_loss": 1.0 / step})
        time.sleep(0.2)


def trial_driving_train(config: dict) -> None:
    """As ``pipelines.sweep.tuner.run_trial`` does: a Tune trial that builds and fits a Train V2 ``TorchTrainer``."""
    trainer = TorchTrainer(
        endless_training,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.5}),
        run_config=ray.train.RunConfig(
            name=f"train-{tune.get_context().get_trial_id()}",
            storage_path=config["storage"],
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


@pytest.mark.timeout(600)
def test_a_stopped_trial_frees_its_cpus_and_the_next_trial_starts(cluster, tmp_path):
    """Each Train run holds 1.5 of the 2 CPUs: the second trial can only start once the first's group is gone."""
    tuner = tune.Tuner(
        tune.with_resources(trial_driving_train, {"CPU": 0.01}),
        param_space={"storage": str(tmp_path / "train")},
        tune_config=tune.TuneConfig(num_samples=2, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="stopped", storage_path=str(tmp_path / "tune"), stop={"step": 3}),
    )
    grid = tuner.fit()
    assert not grid.errors
    assert [r.metrics["step"] >= 3 for r in grid] == [True, True]  # both ran, both were stopped by Tune
    assert all(r.metrics["step"] < 50 for r in grid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # removal is asynchronous; a leaked group stays CREATED for good
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and ray.available_resources().get("CPU", 0) == 2:
            break
        time.sleep(1)
    assert live == [], live
    assert ray.available_resources().get("CPU", 0) == 2


def logging_trial(config: dict) -> None:
    client = MlflowClient(config["uri"])
    run_id = client.create_run(config["experiment_id"], tags={"mlflow.parentRunId": config["parent"]}).info.run_id
    for step in range(config["steps"]):
        now = int(time.time() * 1000)
        metrics = [Metric(name, step * 0.5, now, step) for name in ("loss", "lm_loss", "lr")]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    tune.report({"logged": config["steps"], "run_id": run_id})


@pytest.mark.timeout(600)
def test_concurrent_trials_lose_no_mlflow_metric_point_on_sqlite(cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("concurrent")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    trials, steps = 4, 150
    grid = tune.Tuner(
        tune.with_resources(logging_trial, {"CPU": 0.25}),
        param_space={
            "uri": uri,
            "experiment_id": experiment_id,
            "parent": parent,
            "steps": steps,
            "i": tune.grid_search(list(range(trials))),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=trials),
        run_config=tune.RunConfig(name="concurrent", storage_path=str(tmp_path / "tune")),
    ).fit()
    assert not grid.errors, [str(e)[-500:] for e in grid.errors]  # no "database is locked"
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == trials and {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        for name in ("loss", "lm_loss", "lr"):
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == list(range(steps)), (run.info.run_id, name)
            assert all(m.value == m.step * 0.5 for m in history)
    starts = sorted(r.info.start_time for r in children)
    ends = sorted(r.info.end_time for r in children)
    assert starts[-1] < ends[0]  # the trials really overlapped: every one started before the first ended
