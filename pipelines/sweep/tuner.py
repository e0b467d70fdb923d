"""Ray Tune over LVPruning configurations: where the decision modules go, how hard they prune, their shape.

- The search is multi-objective Optuna (``accuracy/mean`` up, ``tflops`` down, at each trial's own schedule);
  ASHA stops trials whose ``sweep.guard_metric`` lags while they train (one metric: ASHA takes one).
- A searched trial (:func:`run_trial`) trains with Ray Train + DeepSpeed (``pipelines.train.experiment.run_training``,
  metrics forwarded by ``TuneReportCallback``), then is evaluated at its schedule and at shifted ones
  (``sweep.infer_shifts``) with no retraining. The training-free methods of ``sweep.baselines`` are
  evaluation-only trials of the same sweep, so they sit on the same frontier.
- MLflow: one parent run per sweep (its config and search space); each trial a child run (its training metrics);
  one child run per evaluated setting beneath it.
- Resume: running the sweep again with the same ``run.name`` restores it (``Tuner.restore``): finished trials are
  not redone, and every MLflow run is found again rather than logged twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
from mlflow import MlflowClient
from mlflow.entities import Param
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pipelines.config import TOY, JobConfig
from pipelines.eval.evaluation import benchmarks_from_config, evaluate
from pipelines.eval.metrics import MEAN, TFLOPS
from pipelines.storage import is_s3, ray_storage
from pipelines.sweep.calibration import (
    SIMILARITY,
    CalibrationSpace,
    calibration_layers,
    calibration_trial,
    check_calibration,
)
from pipelines.sweep.space import LVPRUNING, DefineByRun, baseline_trials, check_space, trial_config
from pipelines.tracking import (
    KIND_TAG,
    PARENT_TAG,
    RUN_NAME_TAG,
    TRIAL_TAG,
    get_or_create_experiment,
    redact,
    runs_with_tags,
    tracking_uri,
    trial_run,
)
from pipelines.train.experiment import check_config, finished_training, prepare_inputs, run_training, text_config

logger = logging.getLogger(__name__)

OBJECTIVES = {MEAN: "max", TFLOPS: "min"}
TRIAL_CPUS = 0.01


def check_sweep(cfg: JobConfig) -> JobConfig:
    """The config of a sweep, checked before any cluster work (the base config as ``check_config`` does, every
    candidate of the space against the model, what only a sweep needs), with every local path made absolute:
    Tune runs each trial in its own working directory."""
    if cfg.stage.exports_model:
        raise ValueError(f"train.stage: a sweep trains decision modules (stage 'pruning'), not {cfg.train.stage!r}")
    if cfg.train.max_steps is not None and cfg.sweep.grace_steps >= cfg.train.max_steps:
        raise ValueError(
            f"sweep.grace_steps {cfg.sweep.grace_steps} is not before train.max_steps {cfg.train.max_steps}: "
            "the guard would never stop a trial"
        )
    uri = tracking_uri(cfg)
    if is_s3(cfg.run.storage_path) and uri.startswith(("sqlite:", "file:", "/")):
        raise ValueError(
            f"mlflow.tracking_uri: {redact(uri)} is a file on this machine, but trials run on the cluster's nodes "
            "(run.storage_path is s3://): point it at an mlflow server"
        )
    text = text_config(cfg)
    if cfg.sweep.objective == SIMILARITY:
        check_calibration(cfg, text.num_hidden_layers)
    else:
        check_space(cfg, text.num_hidden_layers, text.hidden_size)
    cfg = check_config(cfg)
    if cfg.model.name_or_path != TOY:
        benchmarks_from_config(cfg)  # every benchmark has its files: found now, not after the first training
    return absolute_paths(cfg).model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its local paths absolute (``s3://`` ones and the model's hub id as they are)."""

    def local(path: str | None) -> str | None:
        return path if path is None or is_s3(path) else str(Path(path).resolve())

    d, r, e = cfg.data, cfg.run, cfg.eval
    data = {k: local(getattr(d, k)) for k in ("toy_root", "train_json", "image_root")}
    benchmarks = {
        name: b.model_copy(update={k: local(getattr(b, k)) for k in ("questions", "image_root", "annotations")})
        for name, b in e.data.items()
    }
    evaluation = {"output_dir": local(e.output_dir or "./eval"), "data": benchmarks}
    evaluation |= {"modules": local(e.modules), "toy_world": local(e.toy_world)}
    update = {
        "data": d.model_copy(update=data),
        "scaling": cfg.scaling.model_copy(update={"deepspeed_config": local(cfg.scaling.deepspeed_config)}),
        "run": r.model_copy(update={"storage_path": local(r.storage_path), "output_dir": local(r.output_dir)}),
        "eval": e.model_copy(update=evaluation),
    }
    if cfg.model.name_or_path != TOY and Path(cfg.model.name_or_path).exists():
        update["model"] = cfg.model.model_copy(update={"name_or_path": local(cfg.model.name_or_path)})
    return cfg.model_copy(update=update)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_run_id: str) -> None:
    """One Tune trial: train (searched trials) or not (baselines), evaluate every schedule of the trial, report
    the objectives at the trial's own schedule (the first)."""
    trial_id = tune.get_context().get_trial_id()
    # Trials run side by side: their Ray Data progress bars would interleave into a flood; Tune's table and each
    # trial's training steps say how far it is.
    ray.data.DataContext.get_current().enable_progress_bars = False
    tags = {PARENT_TAG: sweep_run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial"}
    if JobConfig.model_validate(base).sweep.objective == SIMILARITY:
        return calibration_trial(JobConfig.model_validate(base), params, trial_id, tags)
    cfg = trial_config(JobConfig.model_validate(base), params, trial_id)
    client = MlflowClient(tracking_uri(cfg))
    if params["method"] == LVPRUNING:
        trained = finished_training(cfg) or run_training(cfg, tags=tags, callbacks=[TuneReportCallback()])
        cfg, model_path, modules, parent = trained.config, trained.model_path, trained.modules, trained.run_id
    else:
        inputs = prepare_inputs(cfg)
        cfg, model_path, modules = inputs.config, inputs.model_path, None
        parent = trial_run(client, cfg, tags, params)
    results = evaluate(cfg, model_path=model_path, modules=modules, parent_run_id=parent)
    if params["method"] != LVPRUNING:
        client.set_terminated(parent, "FINISHED")
    own = results[0].metrics
    tune.report({name: own[name] for name in OBJECTIVES} | {"settings": len(results), "mlflow_run_id": parent})


class BaselinesFirst(Searcher):
    """Hands out the evaluation-only baseline trials first, then the wrapped searcher's. The baselines are not
    the searcher's trials: their results do not reach it."""

    def __init__(self, baselines: list[dict[str, Any]], searcher: Searcher) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.baselines, self.searcher, self.baseline_ids = list(baselines), searcher, set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.baselines:
            self.baseline_ids.add(trial_id)
            return self.baselines.pop(0)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.baseline_ids:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.baseline_ids:
            return
        if result is not None and not all(name in result for name in OBJECTIVES):
            result = None  # stopped early (ASHA) before it was evaluated: Optuna records it as pruned
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:  # Tune saves the wrapped searcher itself, beside this state
        return {"baselines": list(self.baselines), "baseline_ids": set(self.baseline_ids)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.baselines, self.baseline_ids = state["baselines"], state["baseline_ids"]


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


class GuardedASHA(ASHAScheduler):
    """ASHA on one metric to minimise, with one rung at step ``rung``: a trial whose metric is among the worst
    ``1 - 1/reduction_factor`` of those recorded there stops, the others train to the end (``max_t`` is the rung,
    ``stop_last_trials=False``). It stops nothing until ``min_trials`` trials have reached the rung (their values
    are recorded all the same): ASHA's cutoff over one or two values stops any trial worse than the first ones."""

    def __init__(self, metric: str, rung: int, reduction_factor: float, min_trials: int) -> None:
        super().__init__(
            time_attr="step",
            metric=metric,
            mode="min",
            max_t=rung,
            grace_period=rung,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
        self.min_trials, self.rung = min_trials, rung
        self.reached: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get("step", 0) >= self.rung:
            self.reached.add(trial.trial_id)
        return action if len(self.reached) > self.min_trials else self.CONTINUE


def sweep_run(cfg: JobConfig) -> str:
    """The sweep's parent MLflow run (created once; found again by the sweep's name when it is resumed)."""
    client = MlflowClient(tracking_uri(cfg))
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    runs = runs_with_tags(client, [experiment_id], {RUN_NAME_TAG: cfg.run.name, KIND_TAG: "sweep"})
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags={RUN_NAME_TAG: cfg.run.name, KIND_TAG: "sweep"})
    space = cfg.sweep.model_dump(mode="json")
    params = {"num_trials": cfg.sweep.num_trials, "concurrency": cfg.sweep.concurrency, "objectives": OBJECTIVES}
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


def build_tuner(cfg: JobConfig, sweep_run_id: str) -> tuple[tune.Tuner, bool]:
    """A fresh Tuner, or the interrupted one restored from ``<run.storage_path>/<run.name>``."""
    storage_path, filesystem = ray_storage(cfg.run.storage_path)
    trainable = tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), sweep_run_id=sweep_run_id)
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
        callbacks=[TrialRunStatus(tracking_uri(cfg), cfg.mlflow.experiment)],
        failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
    )
    if cfg.sweep.objective == SIMILARITY:  # evaluation-only trials: no baselines, no training to guard
        c = cfg.sweep.calibration
        num_layers = text_config(cfg).num_hidden_layers
        space = CalibrationSpace(c, calibration_layers(cfg, num_layers), num_layers)
        search = OptunaSearch(space=space, metric=SIMILARITY, mode="max", sampler=TPESampler(seed=cfg.sweep.seed))
        tune_config = tune.TuneConfig(
            search_alg=search, num_samples=cfg.sweep.num_trials, max_concurrent_trials=cfg.sweep.concurrency
        )
        return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config), False
    optuna = OptunaSearch(
        space=DefineByRun(cfg.sweep.space),
        metric=list(OBJECTIVES),
        mode=list(OBJECTIVES.values()),
        sampler=TPESampler(seed=cfg.sweep.seed),
    )
    s = cfg.sweep
    guard = GuardedASHA(s.guard_metric, s.grace_steps, s.reduction_factor, s.guard_min_trials)
    baselines = baseline_trials(cfg)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=BaselinesFirst(baselines, optuna),
            scheduler=guard,
            num_samples=len(baselines) + cfg.sweep.num_trials,
            max_concurrent_trials=cfg.sweep.concurrency,
        ),
        run_config=run_config,
    )
    return tuner, False


def run_sweep(cfg: JobConfig) -> SweepResult:
    """Run (or resume) the sweep of ``cfg`` (checked by :func:`check_sweep`). Ray must be initialized."""
    # ASHA guards the training reports only: the baselines' and the evaluations' reports carry no training loss.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    prepare_inputs(cfg)  # the toy world and its base model, once, before the trials need them
    sweep_run_id = sweep_run(cfg)
    tuner, restored = build_tuner(cfg, sweep_run_id)
    client = MlflowClient(tracking_uri(cfg))
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(sweep_run_id, "KILLED")
        raise
    ended = {r.metrics.get("trial_id") for r in grid if r.metrics} - {None}
    if restored:  # trials started after Tune's last save of its state are not in it: their runs end KILLED
        end_orphans(client, cfg.mlflow.experiment, sweep_run_id, ended)
    expected = cfg.sweep.num_trials + (len(baseline_trials(cfg)) if cfg.sweep.objective != SIMILARITY else 0)
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
