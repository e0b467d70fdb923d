"""Ray Tune over a sweep's trials, whatever its objective (``pipelines.sweep.objectives``): the Tuner, its MLflow
runs, and resume.

- The objective (``sweep.objective``) gives the searcher, the scheduler, the number of trials and the trial itself.
- MLflow: one parent run per sweep (its config and search space); each trial a child run; one child run per
  evaluated setting beneath it.
- Resume: running the sweep again with the same ``run.name`` restores it (``Tuner.restore``): finished trials are
  not redone, and every MLflow run is found again rather than logged twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from mlflow import MlflowClient
from mlflow.entities import Param
from ray import tune

from pipelines.cluster import check_seen, for_every_node
from pipelines.config import JobConfig
from pipelines.eval.evaluation import benchmarks_from_config
from pipelines.job import Job, resolve
from pipelines.storage import is_s3, ray_storage
from pipelines.sweep.objectives import objective_of
from pipelines.tracking import (
    KIND_TAG,
    PARENT_TAG,
    RUN_NAME_TAG,
    TRIAL_TAG,
    get_or_create_experiment,
    redact,
    runs_with_tags,
)
from pipelines.train.experiment import check_training, prepare_model, toy_world

logger = logging.getLogger(__name__)

TRIAL_CPUS = 0.01


def check_sweep(cfg: JobConfig) -> Job:
    """The sweep's job, resolved and checked before any cluster work: the config as a training job's, the objective's
    part (every candidate of the search space against the model), and what only a sweep needs."""
    if cfg.stage.exports_model:
        raise ValueError(f"train.stage: a sweep trains decision modules (stage 'pruning'), not {cfg.train.stage!r}")
    if cfg.train.max_steps is not None and cfg.sweep.grace_steps >= cfg.train.max_steps:
        raise ValueError(
            f"sweep.grace_steps {cfg.sweep.grace_steps} is not before train.max_steps {cfg.train.max_steps}: "
            "the guard would never stop a trial"
        )
    job = resolve(cfg)
    uri = job.config.mlflow.tracking_uri
    if is_s3(cfg.run.storage_path) and uri.startswith(("sqlite:", "file:", "/")):
        raise ValueError(
            f"mlflow.tracking_uri: {redact(uri)} is a file on this machine, but trials run on the cluster's nodes "
            "(run.storage_path is s3://): point it at an mlflow server"
        )
    objective_of(job).check(job)
    check_training(job)
    if not job.is_toy:
        benchmarks_from_config(job.config)  # every benchmark has its files: found now, not after the first training
    return job


def check_trial_inputs(job: Job) -> None:
    """The trials run on any node and read the training data and the benchmarks themselves: each local one must be
    seen by every node (the toy world's are written on each); ``ValueError`` naming the key otherwise."""
    if job.is_toy:
        return
    cfg = job.config
    inputs = {"data.train_json": cfg.data.train_json, "data.image_root": cfg.data.image_root}
    for name, b in cfg.eval.data.items():
        inputs |= {f"eval.data.{name}.{k}": getattr(b, k) for k in ("questions", "image_root", "annotations")}
    for key, path in inputs.items():
        check_seen(path, key, "the trials run there: use s3:// or a filesystem every node mounts")


def run_trial(params: dict[str, Any], *, job: Job, sweep_run_id: str) -> None:
    """One Tune trial of the sweep's objective."""
    # Trials run side by side: their Ray Data progress bars would interleave into a flood; Tune's table and each
    # trial's training steps say how far it is.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if job.is_toy:  # this node's own copy of the toy world (written once, the same from data.seed on every node)
        toy_world(job)
    trial_id = tune.get_context().get_trial_id()
    tags = {PARENT_TAG: sweep_run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial"}
    objective_of(job).trial(job, params, trial_id, tags)


class TrialRunStatus(tune.Callback):
    """Ends the MLflow runs of a trial that Tune ended while they ran: KILLED when stopped early, FAILED on an
    error (a trial that ended normally has finished its runs itself)."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A trial that ended normally finished its runs; one stopped early may have had its training run end
        # FAILED on the way out (its Train run was aborted).
        end_trial_runs(MlflowClient(self.uri), self.experiment, trial.trial_id, "KILLED", ("RUNNING", "FAILED"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        end_trial_runs(MlflowClient(self.uri), self.experiment, trial.trial_id, "FAILED")


def end_trial_runs(
    client: MlflowClient, experiment: str, trial_id: str, status: str, ending: tuple[str, ...] = ("RUNNING",)
) -> int:
    """End the runs of a trial (its own and those beneath them) whose status is one of ``ending`` with ``status``;
    how many."""
    experiment_id = get_or_create_experiment(client, experiment)
    ended = 0
    for run in runs_with_tags(client, [experiment_id], {TRIAL_TAG: trial_id}):
        children = runs_with_tags(client, [experiment_id], {PARENT_TAG: run.info.run_id})
        for r in [run, *children]:
            if r.info.status in ending:
                client.set_terminated(r.info.run_id, status)
                ended += 1
    return ended


def sweep_run(job: Job) -> str:
    """The sweep's parent MLflow run (created once; found again by the sweep's name when it is resumed)."""
    cfg = job.config
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    runs = runs_with_tags(client, [experiment_id], {RUN_NAME_TAG: cfg.run.name, KIND_TAG: "sweep"})
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags={RUN_NAME_TAG: cfg.run.name, KIND_TAG: "sweep"})
    space = cfg.sweep.model_dump(mode="json")
    params = {"num_trials": cfg.sweep.num_trials, "concurrency": cfg.sweep.concurrency}
    params["objectives"] = objective_of(job).metrics
    client.log_batch(run.info.run_id, params=[Param(f"sweep.{k}", json.dumps(v)) for k, v in params.items()])
    client.log_dict(run.info.run_id, redact(cfg.model_dump(mode="json")), "config.json")
    client.log_dict(run.info.run_id, space, "search_space.json")
    return run.info.run_id


@dataclass(frozen=True)
class SweepResult:
    grid: tune.ResultGrid
    restored: bool  # resumed from an earlier, interrupted run of the sweep
    interrupted: bool  # stopped (Ctrl-C) before every trial ended: run the same command again to resume
    run_id: str  # the sweep's MLflow run


def build_tuner(job: Job, sweep_run_id: str) -> tuple[tune.Tuner, bool]:
    """A fresh Tuner for the sweep's objective, or the interrupted one restored from
    ``<run.storage_path>/<run.name>``."""
    cfg, objective = job.config, objective_of(job)
    storage_path, filesystem = ray_storage(cfg.run.storage_path)
    trainable = tune.with_parameters(run_trial, job=job, sweep_run_id=sweep_run_id)
    # A trial only drives Ray Train and Ray Data, which hold the CPUs (GPUs); Tune needs a non-empty request.
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPUS})
    path = f"{storage_path.rstrip('/')}/{cfg.run.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=filesystem)
        return tuner, True
    run_config = tune.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[TrialRunStatus(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)],
        failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
    )
    tune_config = tune.TuneConfig(
        search_alg=objective.searcher(job),
        scheduler=objective.scheduler(job),
        num_samples=objective.num_trials(job),
        max_concurrent_trials=cfg.sweep.concurrency,
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config), False


def run_sweep(job: Job) -> SweepResult:
    """Run (or resume) the sweep of ``job`` (from :func:`check_sweep`). Ray must be initialized."""
    # ASHA guards the training reports only: the baselines' and the evaluations' reports carry no training loss.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    cfg = job.config
    # The base model (the toy world's: written and trained once, here) and the decision modules the trials start
    # from, where the trials' nodes read them; the inputs the trials read themselves, checked.
    storage = cfg.run.storage_path
    base = for_every_node(prepare_model(job), "model.name_or_path", storage)
    modules = for_every_node(cfg.eval.modules, "eval.modules", storage)
    job = job.with_base(base).replace(eval=cfg.eval.model_copy(update={"modules": modules}))
    check_trial_inputs(job)
    sweep_run_id = sweep_run(job)
    tuner, restored = build_tuner(job, sweep_run_id)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(sweep_run_id, "KILLED")
        raise
    ended = {r.metrics.get("trial_id") for r in grid if r.metrics} - {None}
    if restored:  # trials started after Tune's last save of its state are not in it: their runs end KILLED
        end_orphans(client, cfg.mlflow.experiment, sweep_run_id, ended)
    expected = objective_of(job).num_trials(job)
    interrupted = len(grid) < expected or grid.num_terminated + grid.num_errors < len(grid)  # Ctrl-C: fit returns
    status = "KILLED" if interrupted else "FAILED" if grid.errors else "FINISHED"
    client.set_terminated(sweep_run_id, status)
    return SweepResult(grid, restored, interrupted, sweep_run_id)


def end_orphans(client: MlflowClient, experiment: str, sweep_run_id: str, trial_ids: set[str]) -> None:
    """End the RUNNING trial runs of the sweep whose trial is not one of ``trial_ids`` (KILLED)."""
    experiment_id = get_or_create_experiment(client, experiment)
    for run in runs_with_tags(client, [experiment_id], {PARENT_TAG: sweep_run_id}, status="RUNNING"):
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id is not None and trial_id not in trial_ids:
            logger.warning("trial %s is not in the restored sweep (started after its last save): run KILLED", trial_id)
            end_trial_runs(client, experiment, trial_id, "KILLED")
