"""Label-free calibration as a sweep (``sweep.objective: hidden_similarity``), VFlowOpt's objective.

A trial prunes ``num_questions`` unlabeled questions (the first human turn of training conversations) with one
method's searched parameters and keep ratios under a retention budget, and scores how little the pruning changes
the answer's starting point: the mean over questions of ``cos(h, h_pruned)``, ``h`` the last prompt token's final
(normed) hidden state. It needs no labels, so it tunes any training-free policy, and LVPruning's inference ratios.
With ``sweep.calibration.evaluate`` each trial is also scored on the labelled benchmarks, and
:func:`calibration_report` says how well the label-free choice matches the labelled optimum.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lvpruning.checkpoint import read_pruning_config
from lvpruning.config import check_schedule
from lvpruning.policies import POLICIES, is_trained
from pipelines.config import Calibration, JobConfig, OwnLayers
from pipelines.conversation import RecordError
from pipelines.eval.evaluation import evaluate
from pipelines.eval.inference import Preprocessor
from pipelines.eval.metrics import MEAN, TFLOPS
from pipelines.eval.models import ModelSpec, Setting, left_padded, load_model, setting_policy
from pipelines.images import batch_images, token_types
from pipelines.job import Job
from pipelines.storage import local_copy
from pipelines.tracking import trial_run
from pipelines.train.data import read_records

SIMILARITY = "hidden_similarity"
RETENTION = "retention"


def retention(layers: Sequence[int], ratios: Sequence[float], num_layers: int) -> float:
    """The fraction of the image's vision tokens a decoder layer sees, averaged over the ``num_layers`` layers (stage
    ``s`` prunes after layer ``layers[s]``; -1: before layer 0)."""
    seen = [1.0] * num_layers
    for layer, ratio in zip(layers, ratios):
        seen[layer + 1 :] = [ratio] * (num_layers - layer - 1)
    return sum(seen) / num_layers


def budget_ratios(
    layers: Sequence[int], leading: Sequence[float], budget: float, num_layers: int, step: float
) -> tuple[float, ...]:
    """``leading`` ratios (all stages but the last), then the last one solved so that :func:`retention` is
    ``budget``, on the grid of ``step``, clipped to ``[step, previous ratio]`` (a budget out of reach is missed:
    the trial reports its real retention)."""
    ceiling, after = (leading[-1] if leading else 1.0), num_layers - layers[-1] - 1  # the layers after the last
    without_last = retention(layers[:-1], leading, num_layers) * num_layers - ceiling * after
    last = min(ceiling, max(step, round((budget * num_layers - without_last) / after / step) * step))
    return (*leading, round(last, 6))


def feasible(
    layers: Sequence[int], leading: Sequence[float], budget: float, num_layers: int, step: float
) -> tuple[float, float]:
    """The next stage's ratios, on the grid of ``step`` and at most the previous one, that keep ``budget`` within
    reach of the stages after it: ``[low, high]``, ``low`` the least with all later ones as high as it, ``high``
    the greatest with all later ones at ``step`` (``low > high``: out of reach)."""
    ceiling, later = (leading[-1] if leading else 1.0), len(layers) - len(leading) - 1
    grid = [round(i * step, 6) for i in range(1, int(ceiling / step + 1e-9) + 1)]
    reach_up = [r for r in grid if retention(layers, (*leading, *[r] * (later + 1)), num_layers) >= budget - 1e-9]
    reach_down = [r for r in grid if retention(layers, (*leading, r, *[step] * later), num_layers) <= budget + 1e-9]
    return (reach_up[0] if reach_up else ceiling), (reach_down[-1] if reach_down else step)


class CalibrationSpace:
    """``OptunaSearch(space=CalibrationSpace(...))``: one trial's policy parameters and keep ratios: each stage but
    the last in ``ratio_range`` and within what keeps the budget reachable (:func:`feasible`), on the grid, the last
    one solved by the budget (:func:`budget_ratios`)."""

    def __init__(self, calibration: Calibration, layers: tuple[int, ...], num_layers: int) -> None:
        self.c, self.layers, self.num_layers = calibration, layers, num_layers

    def __call__(self, trial: Any) -> dict[str, Any]:
        c, leading = self.c, []
        for name, (low, high) in c.params.items():
            trial.suggest_float(name, low, high)
        for s in range(len(self.layers) - 1):
            low, high = feasible(self.layers, leading, c.budget, self.num_layers, c.ratio_step)
            if max(low, c.ratio_range[0]) <= min(high, c.ratio_range[1]):  # the budget first, then the range
                low, high = max(low, c.ratio_range[0]), min(high, c.ratio_range[1])
            ratio = trial.suggest_float(f"ratio{s}", min(low, high), max(low, high))
            leading.append(min(1.0, max(c.ratio_step, round(ratio / c.ratio_step) * c.ratio_step)))
        ratios = budget_ratios(self.layers, leading, c.budget, self.num_layers, c.ratio_step)
        return {"method": c.method, "layers": list(self.layers), "ratios": list(ratios)}


def calibration_layers(cfg: JobConfig, num_layers: int) -> tuple[int, ...]:
    """The calibrated stages: ``sweep.calibration.layers``, LVPruning's modules' (``eval.modules``), or the
    method's published ones on the model."""
    c = cfg.sweep.calibration
    if is_trained(c.method):
        if cfg.eval.modules is None:
            raise ValueError(f"sweep.calibration.method {c.method} calibrates trained modules: set eval.modules")
        modules = read_pruning_config(cfg.eval.modules).layers
        if c.layers is not None and tuple(c.layers) != modules:
            raise ValueError(f"sweep.calibration.layers: the decision modules sit after {list(modules)}")
        return modules
    return tuple(c.layers) if c.layers is not None else POLICIES[c.method].published.on(num_layers).layers


def check_calibration(cfg: JobConfig, num_layers: int) -> None:
    """A calibration sweep's method, stages and budget against the model, before any cluster work."""
    c = cfg.sweep.calibration
    layers = calibration_layers(cfg, num_layers)
    check_schedule(layers, (1.0,) * len(layers), num_layers)
    if not is_trained(c.method):
        POLICIES[c.method]().check_layers(layers)
    if c.budget < retention(layers, (c.ratio_step,) * len(layers), num_layers):
        raise ValueError(f"sweep.calibration.budget {c.budget} is below what layers {list(layers)} can reach")


def calibration_requests(
    train_json: str, image_root: str, processor: Any, calibration: Calibration
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], int]:
    """The prompts (each (L,)) and images (``pixel_values`` and the size key where the model takes one: one array
    per prompt) of ``num_questions`` training conversations (their first human turn, no answer), sampled with
    ``seed``; records without a usable image are skipped and counted (third)."""
    records = read_records(train_json)
    order = list(range(len(records)))
    random.Random(calibration.seed).shuffle(order)
    pre, requests, skipped = Preprocessor(processor, image_root), [], 0
    for i in order:
        record = records[i]
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or not record.get("image"):
            skipped += 1
            continue
        try:
            requests.append(pre.request(str(turns[0]["value"]), str(record["image"])))
        except RecordError:
            skipped += 1
            continue
        if len(requests) == calibration.num_questions:
            break
    if not requests:
        raise ValueError(f"{train_json}: no conversation with a usable image for the calibration set")
    images = {k: [r[k] for r in requests] for k in requests[0] if k != "input_ids"}
    return [r["input_ids"] for r in requests], images, skipped


@torch.no_grad()
def hidden_similarity(
    spec: ModelSpec,
    setting: Setting,
    prompts: list[np.ndarray],
    images: dict[str, list[np.ndarray]],
    pad_id: int,
    batch_size: int,
    device: str = "cpu",
) -> float:
    """Mean over the prompts of the cosine similarity between the last prompt token's final hidden state without
    and with ``setting``'s pruning (left-padded batches of ``batch_size``, fp32 cosine; a NaN one counts 0, as in
    VFlowOpt's optimiser), with the model on ``device``."""
    model = load_model(spec, setting.method, device)
    policy = setting_policy(model, setting)
    base = model.model.model  # Hugging Face's LlavaModel (or Qwen-VL's): its last_hidden_state is after the final norm
    param = next(model.parameters())
    similarities = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_padded(prompts[start : start + batch_size], pad_id)
        inputs = {"input_ids": input_ids.to(param.device), "attention_mask": attention_mask.to(param.device)}
        batch = batch_images({k: v[start : start + batch_size] for k, v in images.items()})
        inputs |= {k: v.to(param.device, param.dtype if k == "pixel_values" else None) for k, v in batch.items()}
        full = base(**token_types(inputs, base.config.image_token_id), use_cache=False).last_hidden_state[:, -1]
        out = model(**inputs, keep_ratios=setting.keep_ratios, policy=policy, layers=setting.layers, logits_to_keep=1)
        cosine = F.cosine_similarity(full.float(), out.last_hidden_state[:, -1].float(), dim=-1)
        similarities += cosine.nan_to_num(0.0).tolist()
    return statistics.fmean(similarities)


def trial_setting(job: Job, params: dict[str, Any]) -> tuple[Setting, Job]:
    """The setting a calibration trial runs, and the job that evaluates it on the labelled benchmarks."""
    cfg = job.config
    c = cfg.sweep.calibration
    own = {k: float(params[k]) for k in c.params}
    ratios = tuple(params["ratios"])
    if is_trained(c.method):
        setting = Setting(c.method, ratios)
        evaluated = {"methods": (c.method,), "schedules": (ratios,), "at_own_layers": ()}
    else:
        setting = Setting(c.method, ratios, layers=tuple(params["layers"]), params=tuple(own.items()))
        one = OwnLayers(method=c.method, layers=tuple(params["layers"]), schedules=(ratios,), params=own)
        evaluated = {"methods": (), "schedules": (), "at_own_layers": (one,)}
    return setting, job.replace(eval=cfg.eval.model_copy(update=evaluated))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 points or a constant side."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    if len(set(rx)) == 1 or len(set(ry)) == 1:
        return math.nan
    return statistics.correlation(rx, ry)


def calibration_report(rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """The trials (``hidden_similarity``, ``accuracy/mean``, ``tflops``, ``retention``, ``config``) as a table,
    best similarity first, and how the label-free choice compares with the labelled optimum: the chosen trial's
    accuracy, the best accuracy, their gap and the rank correlation of similarity and accuracy."""
    rows = sorted(rows, key=lambda r: -r[SIMILARITY])
    lines = [f"{'hidden_sim':>10} {'accuracy':>9} {'retention':>9} {'tflops':>10}  config"]
    for r in rows:
        accuracy = r.get(MEAN, math.nan)
        lines.append(
            f"{r[SIMILARITY]:>10.5f} {accuracy:>9.2f} {r[RETENTION]:>9.4f} {r.get(TFLOPS, math.nan):>10.3e}  "
            f"{r['config']}"
        )
    metrics = {"calibration/trials": float(len(rows)), "calibration/chosen_similarity": rows[0][SIMILARITY]}
    scored = [r for r in rows if MEAN in r]
    if scored:
        chosen, best = scored[0][MEAN], max(r[MEAN] for r in scored)
        rho = spearman([r[SIMILARITY] for r in scored], [r[MEAN] for r in scored])
        metrics |= {"calibration/chosen_accuracy": chosen, "calibration/best_accuracy": best}
        metrics |= {"calibration/accuracy_gap": best - chosen, "calibration/spearman": rho}
        lines.append(
            f"label-free choice: accuracy {chosen:.2f} (labelled optimum {best:.2f}, gap {best - chosen:.2f}); "
            f"Spearman's rho of similarity and accuracy over {len(scored)} trials: {rho:.3f}"
        )
    return "\n".join(lines), metrics


def calibration_trial(job: Job, params: dict[str, Any], trial_id: str, tags: dict[str, str]) -> None:
    """One label-free calibration trial: the hidden-state similarity on the calibration set (a Ray task with the
    evaluation's resources: a GPU with ``eval.use_gpu``), then (with ``sweep.calibration.evaluate``) the labelled
    benchmarks at the same setting, beneath the trial's run. A resumed trial reuses what its run already holds."""
    cfg = job.config
    c = cfg.sweep.calibration
    run = cfg.run.model_copy(update={"name": f"{cfg.run.name}-{trial_id}"})
    job = job.replace(run=run, eval=cfg.eval.model_copy(update={"output_dir": f"{cfg.eval.output_dir}/{run.name}"}))
    cfg, model_path = job.config, job.base_model
    setting, evaluated = trial_setting(job, params)
    modules = cfg.eval.modules if is_trained(c.method) else None
    layers = setting.layers or read_pruning_config(local_copy(modules)).layers
    client = MlflowClient(cfg.mlflow.tracking_uri)
    parent = trial_run(client, cfg, tags, {"method": c.method, "layers": list(layers)})
    keys = (SIMILARITY, RETENTION, "calibration_questions", "calibration_skipped")
    report = {k: v for k, v in client.get_run(parent).data.metrics.items() if k in keys}
    if len(report) < len(keys):  # not measured yet (a resumed trial measured before keeps its values)
        m = cfg.model
        spec = ModelSpec(model_path, modules, cfg.pruning, m.dtype, m.attn_implementation, m.processor.options())
        spec = spec.for_every_node(cfg.run.storage_path)  # read by a Ray task, maybe on another node
        processor = spec.processor()
        prompts, images, skipped = calibration_requests(cfg.data.train_json, cfg.data.image_root, processor, c)
        ev = cfg.eval
        task = ray.remote(hidden_similarity).options(
            num_cpus=ev.cpus_per_actor,
            num_gpus=1 if ev.use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),  # not the trial's own group
        )
        pad, device = processor.tokenizer.pad_token_id, "cuda" if ev.use_gpu else "cpu"
        similarity = ray.get(task.remote(spec, setting, prompts, images, pad, c.batch_size, device))
        report = {
            SIMILARITY: similarity,
            RETENTION: retention(layers, setting.keep_ratios, job.num_layers),
        }
        report |= {"calibration_questions": float(len(prompts)), "calibration_skipped": float(skipped)}
        client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in report.items()])
        client.log_param(parent, "setting", setting.name)
    if c.evaluate:
        own = evaluate(evaluated, model_path=model_path, modules=modules, parent_run_id=parent)[0].metrics
        report |= {name: own[name] for name in (MEAN, TFLOPS)}
    client.set_terminated(parent, "FINISHED")
    tune.report(report | {"setting": setting.name, "mlflow_run_id": parent})


def report_calibration(job: Job, grid: Any, run_id: str) -> str:
    """The calibration sweep's table (its Tune ``grid``) and how the label-free choice matches the labelled optimum
    (:func:`calibration_report`), logged on the sweep's MLflow run (a resumed sweep logs only
    the values that changed; the run's status stays as :func:`run_sweep` set it)."""
    keys = (SIMILARITY, RETENTION, MEAN, TFLOPS)
    rows = [
        {k: r.metrics[k] for k in keys if k in r.metrics} | {"config": r.metrics["setting"]}
        for r in grid
        if r.metrics and SIMILARITY in r.metrics
    ]
    if not rows:
        return "no calibration trial finished"
    table, metrics = calibration_report(rows)
    client = MlflowClient(job.config.mlflow.tracking_uri)
    logged, now = client.get_run(run_id).data.metrics, int(time.time() * 1000)
    changed = {k: v for k, v in metrics.items() if v == v and logged.get(k) != v}  # NaN (no rank) is not logged
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in changed.items()])
    client.log_text(run_id, table, "calibration.txt")
    return table
