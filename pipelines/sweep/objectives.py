"""What a sweep optimises (``sweep.objective``), one object each, chosen once (``objective_of``).

An objective checks its part of the config before any cluster work, names its Tune searcher, scheduler and number
of trials, runs one trial, and reports the sweep at the end. The tuner (``pipelines.sweep.tuner``) knows nothing of
which one it runs.

- ``accuracy`` (:class:`AccuracySearch`): multi-objective Optuna over LVPruning configurations (``accuracy/mean``
  up, ``tflops`` down); the training-free baselines are evaluation-only trials of the same sweep; ASHA
  (:class:`GuardedASHA`) stops trials whose ``sweep.guard_metric`` lags while they train; the report is the
  Pareto frontier (``pipelines.frontier``).
- ``hidden_similarity`` (:class:`HiddenSimilarity`): VFlowOpt's label-free calibration of one method
  (``pipelines.sweep.calibration``).
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lvpruning.policies import is_trained
from pipelines.eval.evaluation import evaluate
from pipelines.eval.metrics import MEAN, TFLOPS
from pipelines.frontier.run import run_frontier
from pipelines.job import Job
from pipelines.sweep.calibration import (
    SIMILARITY,
    CalibrationSpace,
    calibration_layers,
    calibration_trial,
    check_calibration,
    report_calibration,
)
from pipelines.sweep.space import DefineByRun, baseline_trials, check_space, trial_job
from pipelines.tracking import redact, trial_run, ui_hint
from pipelines.train.experiment import finished_training, run_training


class Objective:
    """The interface; ``metrics`` (Tune's metric -> ``max`` or ``min``) is logged on the sweep's MLflow run."""

    name: str
    metrics: dict[str, str]

    def check(self, job: Job) -> None:
        """Its part of the config against the model; fails before any cluster work, naming the key."""

    def plan(self, job: Job) -> str:
        """One line the job prints before it starts."""
        raise NotImplementedError

    def searcher(self, job: Job) -> Searcher:
        raise NotImplementedError

    def scheduler(self, job: Job) -> TrialScheduler | None:
        return None

    def num_trials(self, job: Job) -> int:
        """Tune's ``num_samples``: every trial the sweep runs."""
        return job.config.sweep.num_trials

    def trial(self, job: Job, params: dict[str, Any], trial_id: str, tags: dict[str, str]) -> None:
        """One Tune trial (``tags`` nest its MLflow runs under the sweep's); ends with ``tune.report``."""
        raise NotImplementedError

    def report(self, job: Job, grid: tune.ResultGrid, run_id: str) -> str:
        """What the job prints at the end (``run_id``: the sweep's MLflow run)."""
        raise NotImplementedError


class AccuracySearch(Objective):
    name = "accuracy"
    metrics = {MEAN: "max", TFLOPS: "min"}

    def check(self, job: Job) -> None:
        check_space(job.config, job.num_layers, job.hidden_size)

    def plan(self, job: Job) -> str:
        cfg = job.config
        s = cfg.sweep
        return (
            f"sweep {cfg.run.name}: {s.num_trials} searched trials + {len(baseline_trials(cfg))} baselines "
            f"({', '.join(s.baselines.methods)}), {s.concurrency} at a time, {cfg.scaling.num_workers} training "
            f"worker(s) each; results under {cfg.run.storage_path}/{cfg.run.name}"
        )

    def searcher(self, job: Job) -> Searcher:
        s = job.config.sweep
        optuna = OptunaSearch(
            space=DefineByRun(s.space),
            metric=list(self.metrics),
            mode=list(self.metrics.values()),
            sampler=TPESampler(seed=s.seed),
        )
        return BaselinesFirst(baseline_trials(job.config), optuna, self.metrics)

    def scheduler(self, job: Job) -> TrialScheduler:
        s = job.config.sweep
        return GuardedASHA(s.guard_metric, s.grace_steps, s.reduction_factor, s.guard_min_trials)

    def num_trials(self, job: Job) -> int:
        return len(baseline_trials(job.config)) + job.config.sweep.num_trials

    def trial(self, job: Job, params: dict[str, Any], trial_id: str, tags: dict[str, str]) -> None:
        """Train (a searched LVPruning trial) or not (a baseline), evaluate every schedule of the trial, report the
        objectives at the trial's own schedule (the first)."""
        job = trial_job(job, params, trial_id)
        client = MlflowClient(job.config.mlflow.tracking_uri)
        if is_trained(params["method"]):
            trained = finished_training(job) or run_training(job, tags=tags, callbacks=[TuneReportCallback()])
            model_path, modules, parent = trained.model_path, trained.modules, trained.run_id
        else:
            model_path, modules = job.base_model, None
            parent = trial_run(client, job.config, tags, params)
        results = evaluate(job, model_path=model_path, modules=modules, parent_run_id=parent)
        if not is_trained(params["method"]):
            client.set_terminated(parent, "FINISHED")
        own = results[0].metrics
        tune.report({name: own[name] for name in self.metrics} | {"settings": len(results), "mlflow_run_id": parent})

    def report(self, job: Job, grid: tune.ResultGrid, run_id: str) -> str:
        cfg = job.config
        frontier = run_frontier(cfg.mlflow.tracking_uri, [cfg.mlflow.experiment])
        uri = redact(cfg.mlflow.tracking_uri)  # shown without the user:password@ a server URL may carry
        links = ui_hint(uri, frontier.experiment_id, frontier.run_id)
        return (
            f"Pareto frontier (accuracy/mean against TFLOPs), frontier run {frontier.run_id}:\n{frontier.table}\n\n"
            f"MLflow: experiment '{cfg.mlflow.experiment}' at {uri}\n  {links}"
        )


class HiddenSimilarity(Objective):
    name = SIMILARITY
    metrics = {SIMILARITY: "max"}

    def check(self, job: Job) -> None:
        check_calibration(job.config, job.num_layers)

    def plan(self, job: Job) -> str:
        cfg = job.config
        c = cfg.sweep.calibration
        return (
            f"calibration {cfg.run.name}: {cfg.sweep.num_trials} trials of {c.method} at retention {c.budget}, "
            f"{c.num_questions} unlabeled questions each, {cfg.sweep.concurrency} at a time"
        )

    def searcher(self, job: Job) -> Searcher:
        cfg = job.config
        space = CalibrationSpace(cfg.sweep.calibration, calibration_layers(cfg, job.num_layers), job.num_layers)
        return OptunaSearch(space=space, metric=SIMILARITY, mode="max", sampler=TPESampler(seed=cfg.sweep.seed))

    def trial(self, job: Job, params: dict[str, Any], trial_id: str, tags: dict[str, str]) -> None:
        calibration_trial(job, params, trial_id, tags)

    def report(self, job: Job, grid: tune.ResultGrid, run_id: str) -> str:
        method = job.config.sweep.calibration.method
        return f"label-free calibration of {method}, best similarity first:\n\n{report_calibration(job, grid, run_id)}"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (AccuracySearch(), HiddenSimilarity())}


def objective_of(job: Job) -> Objective:
    """The objective ``sweep.objective`` names."""
    return OBJECTIVES[job.config.sweep.objective]


class BaselinesFirst(Searcher):
    """Hands out the evaluation-only baseline trials first, then the wrapped searcher's. The baselines are not
    the searcher's trials: their results do not reach it. A trial that ends without every one of ``metrics``
    (stopped early by ASHA, before it was evaluated) reaches it as pruned."""

    def __init__(self, baselines: list[dict[str, Any]], searcher: Searcher, metrics: dict[str, str]) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.baselines, self.searcher, self.baseline_ids = list(baselines), searcher, set()
        self.metrics = metrics

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
        if result is not None and not all(name in result for name in self.metrics):
            result = None  # Optuna records it as pruned
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:  # Tune saves the wrapped searcher itself, beside this state
        return {"baselines": list(self.baselines), "baseline_ids": set(self.baseline_ids)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.baselines, self.baseline_ids = state["baselines"], state["baseline_ids"]


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
