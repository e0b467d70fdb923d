"""A sweep's trials: the search space as an Optuna define-by-run function, the training-free baselines, and the
job config each trial trains and evaluates.

A searched trial's parameters: ``layers`` (one of ``sweep.space.layers``; with ``sweep.space.tower_stage`` also
``tower_stage``, whether its first module moves to the vision-tower stage -1), its keep-ratio schedule (``rho`` of the
paper's family ``[rho, rho - 0.2, rho - 0.4, ...]``, or free ratios ``ratio0..``, sorted non-increasing), the
decision-module shape (``num_blocks``, ``num_heads``, ``ffn_dim``, and ``decision_dim`` when the space has it)
and optionally ``learning_rate``. It trains at
its schedule and is evaluated there and at its schedule shifted by each of ``sweep.infer_shifts``.
"""

from __future__ import annotations

import itertools
from typing import Any

from lvpruning import PruningConfig
from lvpruning.config import check_schedule, paper_schedule
from lvpruning.policies import LearnedPolicy, is_trained
from pipelines.config import JobConfig, OwnLayers, SearchSpace, grid_range
from pipelines.job import Job


def on_grid(value: float, step: float) -> float:
    return round(round(value / step) * step, 6)


class DefineByRun:
    """``OptunaSearch(space=DefineByRun(...))``: suggests one trial's parameters; returns the derived ones (the
    stages as a list and the training schedule), which Tune merges into the trial's config."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        s = self.space
        choice = trial.suggest_categorical("layers", [",".join(map(str, layers)) for layers in s.layers])
        layers = [int(x) for x in choice.split(",")]
        if s.tower_stage and trial.suggest_categorical("tower_stage", [False, True]):
            layers[0] = -1  # the first module on the input embeddings, before decoder layer 0
        if s.ratios == "paper":
            low, high = grid_range(*s.rho_range(len(layers)), s.ratio_step)
            rho = trial.suggest_float("rho", low, high, step=s.ratio_step)
            ratios = list(paper_schedule(rho, len(layers), s.rho_step))
        else:
            low, high = grid_range(*s.free_range, s.ratio_step)
            free = [trial.suggest_float(f"ratio{i}", low, high, step=s.ratio_step) for i in range(len(layers))]
            ratios = sorted((on_grid(r, s.ratio_step) for r in free), reverse=True)
        trial.suggest_categorical("num_blocks", list(s.num_blocks))
        trial.suggest_categorical("num_heads", list(s.num_heads))
        trial.suggest_categorical("ffn_dim", list(s.ffn_dim))
        if s.decision_dim is not None:
            trial.suggest_categorical("decision_dim", list(s.decision_dim))
        if s.learning_rate is not None:
            trial.suggest_float("learning_rate", *s.learning_rate, log=True)
        return {"method": LearnedPolicy.name, "layers": layers, "train_ratios": ratios}


def baseline_trials(cfg: JobConfig) -> list[dict[str, Any]]:
    """One evaluation-only trial per training-free method of ``sweep.baselines``, at ``pruning.layers``, then one per
    entry of ``sweep.baselines.at_own_layers`` (its layers, schedules and parameters)."""
    b = cfg.sweep.baselines
    trials = [{"method": m, "layers": list(cfg.pruning.layers)} for m in b.methods]
    own = [o.model_dump(mode="json") for o in b.at_own_layers]
    return trials + [{**o, "schedules": [list(r) for r in o["schedules"]]} for o in own]


def shifted_schedules(ratios: list[float], shifts: tuple[float, ...], step: float) -> list[tuple[float, ...]]:
    """``ratios``, then ``ratios + shift`` per shift (each ratio kept within ``[step, 1]``), without repeats."""
    out = [tuple(ratios)]
    for shift in shifts:
        schedule = tuple(min(1.0, max(step, on_grid(r + shift, step))) for r in ratios)
        if schedule not in out:
            out.append(schedule)
    return out


def trial_job(job: Job, params: dict[str, Any], trial_id: str) -> Job:
    """The job of one trial: its stages, schedule and module shape, ``<run.name>-<trial_id>`` as the run name (its
    checkpoints, exports and MLflow runs), what to evaluate, and its own answers folder ``<eval.output_dir>/<run
    name>`` (settings of different trials share names)."""
    cfg = job.config
    method, layers = params["method"], tuple(params["layers"])
    run = cfg.run.model_copy(update={"name": f"{cfg.run.name}-{trial_id}"})
    answers = f"{cfg.eval.output_dir}/{run.name}"
    update: dict[str, Any] = {"run": run}
    if is_trained(method):
        ratios = tuple(params["train_ratios"])
        shape = {k: params[k] for k in ("num_blocks", "num_heads", "ffn_dim", "decision_dim") if k in params}
        pruning = {**cfg.pruning.to_dict(), "layers": layers, "train_ratios": ratios, "infer_ratios": ratios, **shape}
        update["pruning"] = PruningConfig.from_dict(pruning)
        if "learning_rate" in params:
            update["train"] = cfg.train.model_copy(update={"learning_rate": params["learning_rate"]})
        schedules = shifted_schedules(list(ratios), cfg.sweep.infer_shifts, cfg.sweep.space.ratio_step)
    elif "schedules" in params:  # a baseline at its own layers
        own = OwnLayers.model_validate({k: params[k] for k in ("method", "layers", "schedules", "params")})
        evaluated = {"methods": (), "schedules": (), "at_own_layers": (own,), "output_dir": answers}
        update["eval"] = cfg.eval.model_copy(update=evaluated)
        return job.replace(**update)
    else:
        schedules = cfg.sweep.baselines.schedules
    evaluated = {"methods": (method,), "schedules": tuple(schedules), "output_dir": answers, "at_own_layers": ()}
    update["eval"] = cfg.eval.model_copy(update=evaluated)
    return job.replace(**update)


def check_space(cfg: JobConfig, num_layers: int, hidden_size: int) -> None:
    """The baselines' schedules fit ``pruning.layers``, and every candidate of the space fits the model (layers
    below the last, widths within the hidden size, heads dividing each width): fails before any cluster work,
    naming the key."""
    for i, schedule in enumerate(cfg.sweep.baselines.schedules):
        try:
            cfg.pruning.check_ratios(schedule)
        except ValueError as e:
            raise ValueError(f"sweep.baselines.schedules[{i}] (at pruning.layers): {e}") from None
    for i, own in enumerate(cfg.sweep.baselines.at_own_layers):
        for schedule in own.schedules:
            try:
                check_schedule(own.layers, schedule, num_layers)
            except ValueError as e:
                raise ValueError(f"sweep.baselines.at_own_layers[{i}] ({own.method}): {e}") from None
    s = cfg.sweep.space
    widths = s.decision_dim if s.decision_dim is not None else (cfg.pruning.decision_dim,)
    for i, layers in enumerate(s.layers):
        for heads, width in itertools.product(s.num_heads, widths):
            ones = (1.0,) * len(layers)
            stages = PruningConfig(
                layers=layers, train_ratios=ones, infer_ratios=ones, num_heads=heads, decision_dim=width
            )
            try:
                stages.check_model(num_layers, hidden_size)
            except ValueError as e:
                key = next((k for k in ("num_heads", "decision_dim") if f"PruningConfig.{k}" in str(e)), f"layers[{i}]")
                raise ValueError(f"sweep.space.{key}: {e}") from None
