"""Evaluate inference settings on benchmarks: answers (``pipelines.eval.inference``) -> scores
(``pipelines.eval.scoring``) -> metrics, one MLflow run per setting.

Metrics of a setting (MLflow names):

- ``accuracy/<benchmark>``: the scorer's headline score in percent; ``accuracy/<benchmark>/<category>`` where the
  scorer splits it by question type (the toy world); ``accuracy/mean`` over the benchmarks. ``ci_low/<accuracy>``
  and ``ci_high/<accuracy>``: the 95% percentile-bootstrap interval over questions of a benchmark's headline and of
  the mean (:mod:`pipelines.eval.scoring.intervals`).
- ``tflops``: the analytic prefill TFLOPs (``lvpruning.flops``) in the paper's convention, 1 image + 30 text
  tokens, the image ``eval.flops_image_size`` for the tiled families: the base model for ``none``; for a pruning
  method with its own overhead counted (LVPruning's decision modules, the training-free methods' recomputed
  attention rows and arithmetic). For ``lrs_vqa`` (LRS-VQA's pyramid), whose cost depends on the tiles each
  question selects, the mean over its questions (tower passes and prompt lengths as each ran), beside
  ``tflops_bound`` (every tile visited selected) and ``pyramid/tiles_encoded``, ``pyramid/tiles_finest``,
  ``pyramid/vision_tokens``.
- ``latency/prefill_ms``, ``latency/e2e_ms`` and their ``_iqr`` spreads: every setting of one evaluation timed in
  one process on the first benchmark's first requests (``pipelines.eval.latency``), before any answering;
  ``unanswered/<benchmark>``: questions with no usable image.

Params: ``method``, ``infer_ratios``, ``layers`` (pruning methods), ``train_ratios`` (``lvpruning``), ``model``,
``modules``, ``benchmarks``; the resolved config is the artifact ``config.json`` (URL credentials removed).
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import LlavaNextConfig

from lvpruning import PruningConfig
from lvpruning.checkpoint import read_pruning_config
from lvpruning.flops import ANYRES_IMAGE_SIZE, analytic_flops
from lvpruning.flops_qwen import is_qwen_vl, processor_image_size
from lvpruning.lrs_vqa import pyramid_bound, pyramid_flops
from lvpruning.policies import NONE, PYRAMID, is_trained
from lvpruning.presets import load_llava_config
from lvpruning.region_focus import region_focus_layers
from pipelines.cluster import for_every_node
from pipelines.config import TOY, JobConfig, OwnLayers, PyramidSection
from pipelines.eval.inference import (
    InferenceOptions,
    InferenceReport,
    answer_signature,
    read_answers,
    read_questions,
    run_inference,
)
from pipelines.eval.latency import LatencyOptions, measure_latency
from pipelines.eval.metrics import E2E_MS, MEAN, PREFILL_MS, TFLOPS, TFLOPS_BOUND, interval_names
from pipelines.eval.models import ModelSpec, Setting
from pipelines.eval.scoring import score
from pipelines.eval.scoring.intervals import interval
from pipelines.job import Job
from pipelines.storage import local_copy
from pipelines.tracking import PARENT_TAG, get_or_create_experiment, redact, runs_with_tags

logger = logging.getLogger(__name__)

PAPER_TEXT_TOKENS = 30  # the paper's FLOPs convention: 1 image + 30 text tokens


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's files: LLaVA questions (jsonl), the image folder, the ground truth where it has its own."""

    name: str
    questions: str
    image_root: str
    annotations: str | None = None


@dataclass
class SettingResult:
    setting: Setting
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark -> the scorer's result
    reports: dict[str, InferenceReport] = field(default_factory=dict)
    run_id: str | None = None


def make_settings(
    methods: Sequence[str],
    schedules: Sequence[Sequence[float]],
    seed: int = 0,
    at_own_layers: Sequence[OwnLayers] = (),
    pyramid: PyramidSection | None = None,
) -> list[Setting]:
    """``none`` once, every pruning method once per keep-ratio schedule (at the model's stages), then each method
    of ``at_own_layers`` at its layers, once per its schedules, then LRS-VQA's ``pyramid`` once per its shares."""
    out = [Setting(NONE)] if NONE in methods else []
    out += [Setting(m, tuple(r), seed) for m in methods if m != NONE for r in schedules]
    out += [Setting(o.method, r, seed, o.layers, tuple(o.params.items())) for o in at_own_layers for r in o.schedules]
    if pyramid is not None:
        own = () if pyramid.base_long_side is None else (("base_long_side", pyramid.base_long_side),)
        out += [Setting(PYRAMID, r, params=own) for r in pyramid.keep_ratios]
    return out


def flops_image_size(model: ModelSpec, llava_config: Any) -> tuple[int, int] | None:
    """The image the FLOPs count assumes: ``model.flops_image_size`` (``eval.flops_image_size``; None: the count's
    default), which on Qwen-VL its own processor (its ``min_pixels`` / ``max_pixels``, ``model.processor`` options
    included) resizes first, e.g. the default to the toy Qwen2.5-VL's 64 x 64."""
    if not is_qwen_vl(llava_config):
        return model.flops_image_size
    size = model.processor().image_processor.size
    return processor_image_size(llava_config, size["shortest_edge"], size["longest_edge"], model.flops_image_size)


def settings_tflops(model: ModelSpec, settings: Sequence[Setting]) -> dict[str, float]:
    """Each setting's :func:`setting_tflops` on ``model`` (its config and FLOPs image read once): setting name ->
    TFLOPs. A setting that does not fit the model fails here."""
    llava_config = load_llava_config(local_copy(model.name_or_path))
    image_size = flops_image_size(model, llava_config)
    return {
        s.name: pyramid_bound_tflops(llava_config, model, s, image_size)
        if s.method == PYRAMID
        else setting_tflops(llava_config, model.pruning, s, image_size)
        for s in settings
    }


def pyramid_bound_tflops(
    llava_config: Any, model: ModelSpec, setting: Setting, image_size: Sequence[int] | None
) -> float:
    """The most one prompt of 1 image of ``image_size`` (default ``ANYRES_IMAGE_SIZE``) + 30 text tokens can cost
    LRS-VQA's pyramid under ``setting`` (:func:`lvpruning.lrs_vqa.pyramid_bound`: every tile of each level visited
    selected), in TFLOPs; what its questions did cost is counted from its answers (:func:`pyramid_metrics`)."""
    focus = model.needs_region_focus()
    if not isinstance(llava_config, LlavaNextConfig):
        raise ValueError(f"method {PYRAMID!r} runs on LLaVA-NeXT (CLIP tiles), got {type(llava_config).__name__}")
    layers = len(region_focus_layers(local_copy(focus)))
    size = image_size or ANYRES_IMAGE_SIZE
    bound = pyramid_bound(llava_config, size, PAPER_TEXT_TOKENS, setting.keep_ratios, setting.base_long_side)
    return sum(pyramid_flops(llava_config, layers, bound.rounds, bound.tiles).values()) / 1e12


def pyramid_metrics(model: ModelSpec, answers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """LRS-VQA's pyramid as its ``answers`` ran (each answer's ``metadata.pyramid``): ``tflops``, the mean over
    questions of :func:`lvpruning.lrs_vqa.pyramid_flops` with the prompt's text counted as 30 tokens (the paper's
    convention, as every other setting's count), and the means of ``pyramid/tiles_encoded`` (tower passes),
    ``pyramid/tiles_finest`` (the finest level reached, whole) and ``pyramid/vision_tokens`` (in the LLM)."""
    llava_config = load_llava_config(local_copy(model.name_or_path))
    layers = len(region_focus_layers(local_copy(model.needs_region_focus())))
    records = [a["metadata"]["pyramid"] for a in answers]
    if not records:
        return {}
    flops = []
    for r in records:
        text = r["rounds"][-1] - r["vision_tokens"]
        rounds = [n - text + PAPER_TEXT_TOKENS for n in r["rounds"]]
        flops.append(sum(pyramid_flops(llava_config, layers, rounds, r["tiles_encoded"]).values()) / 1e12)
    out = {TFLOPS: statistics.fmean(flops)}
    for key in ("tiles_encoded", "tiles_finest", "vision_tokens"):
        out[f"pyramid/{key}"] = statistics.fmean(r[key] for r in records)
    return out


def setting_tflops(
    llava_config: Any, pruning: PruningConfig | None, setting: Setting, image_size: Sequence[int] | None = None
) -> float:
    """Analytic prefill TFLOPs of ``setting`` in the paper's convention (see the module docstring) on an image of
    ``image_size`` (:func:`flops_image_size`); ``pruning``: the stages and decision-module shape (unused by
    ``none``)."""
    if setting.method == NONE:  # the baseline count does not depend on the stages: any valid ones will do
        one_stage = PruningConfig(layers=(0,), train_ratios=(1.0,), infer_ratios=(1.0,), num_heads=1)
        report = analytic_flops(llava_config, one_stage, num_text_tokens=PAPER_TEXT_TOKENS, image_size=image_size)
        return report.baseline / 1e12
    if pruning is None:
        raise ValueError(f"method {setting.method!r}: the FLOPs count needs the pruning stages (ModelSpec.pruning)")
    report = analytic_flops(
        llava_config,
        pruning,
        setting.keep_ratios,
        PAPER_TEXT_TOKENS,
        method=setting.method,
        layers=setting.layers,
        params=dict(setting.params),
        image_size=image_size,
    )
    return report.pruned / 1e12


def answer_settings(
    model: ModelSpec,
    settings: Sequence[Setting],
    benchmarks: Sequence[Benchmark],
    output_dir: str | Path,
    options: InferenceOptions | None = None,
) -> dict[str, dict[str, InferenceReport]]:
    """Answer every benchmark under every setting, one pass per benchmark (:func:`run_inference`): answers go to
    ``<output_dir>/<setting>/<benchmark>.jsonl`` (resumable per setting). Setting name -> benchmark -> report."""
    reports: dict[str, dict[str, InferenceReport]] = {s.name: {} for s in settings}
    if not settings:
        return reports
    options = options or InferenceOptions()
    for bench in benchmarks:
        files = {s: Path(output_dir) / s.name / f"{bench.name}.jsonl" for s in settings}
        answered = run_inference(bench.name, bench.questions, bench.image_root, files, model, options)
        for name, report in answered.items():
            reports[name][bench.name] = report
    return reports


def evaluate_setting(
    model: ModelSpec,
    setting: Setting,
    benchmarks: Sequence[Benchmark],
    output_dir: str | Path,
    options: InferenceOptions | None = None,
    reports: Mapping[str, InferenceReport] | None = None,
    questions: Mapping[str, list[dict[str, Any]]] | None = None,
    tflops: float | None = None,
) -> SettingResult:
    """Score every benchmark under ``setting`` from its answers in ``<output_dir>/<setting>/<name>.jsonl``, answered
    first (:func:`answer_settings`, this setting alone) unless ``reports`` says another pass answered them.
    ``questions``: each benchmark's records, and ``tflops`` the setting's count, as :func:`run_settings` got them
    once for many settings (else read and counted here). No MLflow: :func:`run_setting` logs the result."""
    options, result = options or InferenceOptions(), SettingResult(setting)
    # First, as it also checks the stages against the model: a bad setting fails before any inference.
    result.metrics[TFLOPS] = settings_tflops(model, [setting])[setting.name] if tflops is None else tflops
    if setting.method == PYRAMID:  # that was the bound; the count of what the questions cost replaces it below
        result.metrics[TFLOPS_BOUND] = result.metrics[TFLOPS]
    answered_all: list[dict[str, Any]] = []
    if reports is None:
        reports = answer_settings(model, [setting], benchmarks, output_dir, options)[setting.name]
    for bench in benchmarks:
        answers = Path(output_dir) / setting.name / f"{bench.name}.jsonl"
        records = questions[bench.name] if questions else read_questions(bench.questions)[: options.max_questions]
        asked = {str(q["question_id"]) for q in records}
        written = read_answers(answers, answer_signature(model, setting))
        answered = [a for qid, a in written.items() if qid in asked]  # earlier runs may have answered more
        answered_all += answered
        scored = score(bench.name, records, answered, bench.annotations)
        result.reports[bench.name], result.scores[bench.name] = reports[bench.name], scored
        result.metrics[f"accuracy/{bench.name}"] = scored["score"]
        result.metrics.update(zip(interval_names(f"accuracy/{bench.name}"), scored["interval"], strict=True))
        for category, value in (scored["breakdown"].get("category") or {}).items():
            result.metrics[f"accuracy/{bench.name}/{category}"] = value
        result.metrics[f"unanswered/{bench.name}"] = float(len(records) - len(answered))
    if setting.method == PYRAMID:
        result.metrics |= pyramid_metrics(model, answered_all)
    result.metrics[MEAN] = statistics.fmean(result.metrics[f"accuracy/{b.name}"] for b in benchmarks)
    mean_replicates = np.mean([result.scores[b.name]["replicates"] for b in benchmarks], axis=0)  # resample-wise
    result.metrics.update(zip(interval_names(MEAN), interval(mean_replicates), strict=True))
    return result


def setting_params(model: ModelSpec, setting: Setting, benchmarks: Sequence[Benchmark]) -> dict[str, str]:
    """The MLflow params of one setting's run (lists as JSON; ``infer_ratios`` is "none" without pruning)."""
    params = {"method": setting.method, "model": redact(model.name_or_path)}
    params |= {"benchmarks": ",".join(b.name for b in benchmarks), "infer_ratios": "none"}
    if setting.method == NONE:
        return params
    params["infer_ratios"] = json.dumps(list(setting.keep_ratios or ()))
    if setting.method == PYRAMID:  # shares per scoring round; no stages, no decision modules
        return (
            params
            | {"region_focus": redact(str(model.region_focus))}
            | ({"policy_params": json.dumps(dict(setting.params))} if setting.params else {})
        )
    if model.pruning is not None:
        params["layers"] = json.dumps(list(setting.layers or model.pruning.layers))
    if setting.params:
        params["policy_params"] = json.dumps(dict(setting.params))
    if model.modules:
        params["modules"] = redact(model.modules)
    if is_trained(setting.method) and model.pruning is not None:
        params["train_ratios"] = json.dumps(list(model.pruning.train_ratios))
    return params


def run_setting(
    model: ModelSpec,
    setting: Setting,
    benchmarks: Sequence[Benchmark],
    output_dir: str | Path,
    options: InferenceOptions | None = None,
    *,
    uri: str,
    experiment: str = "lvpruning",
    config: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    latency: Mapping[str, float] | None = None,
    reports: Mapping[str, InferenceReport] | None = None,
    questions: Mapping[str, list[dict[str, Any]]] | None = None,
    tflops: float | None = None,
) -> SettingResult:
    """:func:`evaluate_setting` (``reports``, ``questions``, ``tflops``: its answers were written by a pass of
    :func:`run_settings`, which read the questions and counted the FLOPs) inside its own MLflow run (ended
    FINISHED, FAILED on an exception, KILLED on Ctrl-C). A client, not ``mlflow.start_run``: it works beside an
    active run (the training job's, which ``parent_run_id`` names so the UI nests this one under it). ``latency``:
    the setting's metrics from :func:`pipelines.eval.latency.measure_latency`, logged with the others.

    Under a parent, a setting has one run: a FINISHED one is returned as it is (a resumed sweep trial does not
    evaluate or log it twice), an unfinished one is continued."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    earlier = child_run(client, experiment_id, parent_run_id, setting.name) if parent_run_id else None
    if earlier is not None and earlier.info.status == "FINISHED":
        logger.info("%s: already evaluated (run %s)", setting.name, earlier.info.run_id)
        return SettingResult(setting, dict(earlier.data.metrics), run_id=earlier.info.run_id)
    if earlier is not None:
        run_id = earlier.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
        run_id = client.create_run(experiment_id, run_name=setting.name, tags=tags).info.run_id
    try:
        params = setting_params(model, setting, benchmarks)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        client.log_dict(run_id, redact(dict(config or {})), "config.json")
        result = evaluate_setting(model, setting, benchmarks, output_dir, options, reports, questions, tflops)
        result.metrics |= latency or {}
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics.items()])
        scores = {b: {k: v for k, v in scored.items() if k != "replicates"} for b, scored in result.scores.items()}
        client.log_dict(run_id, scores, "scores.json")
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    logger.info("%s (run %s): %s", setting.name, run_id, {k: float(f"{v:.4g}") for k, v in result.metrics.items()})
    result.run_id = run_id
    return result


def run_settings(
    model: ModelSpec,
    settings: Sequence[Setting],
    benchmarks: Sequence[Benchmark],
    output_dir: str | Path,
    options: InferenceOptions | None = None,
    *,
    uri: str,
    experiment: str = "lvpruning",
    config: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    latency: Mapping[str, Mapping[str, float]] | None = None,
) -> list[SettingResult]:
    """Every setting: answered in one pass per benchmark (:func:`answer_settings`: the questions preprocessed
    once, the model loaded once per actor), then scored and logged in its own MLflow run (:func:`run_setting`).
    Each setting's FLOPs are counted first, so a setting that does not fit the model fails before any inference;
    settings already FINISHED under ``parent_run_id`` are not answered again. ``latency``: setting name -> its
    metrics."""
    tflops = settings_tflops(model, settings)
    pending = list(settings)
    if parent_run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, experiment)
        finished = {
            s.name
            for s in settings
            if (run := child_run(client, experiment_id, parent_run_id, s.name)) and run.info.status == "FINISHED"
        }
        pending = [s for s in settings if s.name not in finished]
    reports = answer_settings(model, pending, benchmarks, output_dir, options)
    common = {"uri": uri, "experiment": experiment, "config": config, "parent_run_id": parent_run_id}
    limit = (options or InferenceOptions()).max_questions
    questions = {b.name: read_questions(b.questions)[:limit] for b in benchmarks}  # once, for every setting
    return [
        run_setting(
            model,
            setting,
            benchmarks,
            output_dir,
            options,
            **common,
            latency=(latency or {}).get(setting.name),
            reports=reports.get(setting.name),
            questions=questions,
            tflops=tflops[setting.name],
        )
        for setting in settings
    ]


def child_run(client: Any, experiment_id: str, parent_run_id: str, name: str) -> Any:
    """The run named ``name`` under ``parent_run_id``, if there is one (the oldest, were there several)."""
    order, tags = ["attributes.start_time ASC"], {PARENT_TAG: parent_run_id}
    runs = runs_with_tags(client, [experiment_id], tags, run_name=name, order_by=order, max_results=1)
    return runs[0] if runs else None


def benchmarks_from_config(config: JobConfig) -> list[Benchmark]:
    """``eval.benchmarks`` with their files from ``eval.data`` (``eval.toy_world`` fills ``toy`` and ``pope``)."""
    data = {name: (d.questions, d.image_root, d.annotations) for name, d in config.eval.data.items()}
    if config.eval.toy_world is not None:
        from pipelines.toy.writer import ToyWorldPaths

        world = ToyWorldPaths.under(Path(config.eval.toy_world))
        data.setdefault("toy", (str(world.test_questions), str(world.image_folder), str(world.test_answers)))
        pope = (str(world.pope_questions), str(world.image_folder), str(world.pope_questions.parent))
        data.setdefault("pope", pope)
    if not config.eval.benchmarks:
        raise ValueError("eval.benchmarks is empty: name at least one benchmark")
    missing = [name for name in config.eval.benchmarks if name not in data]
    if missing:
        raise ValueError(f"eval.data has no files for benchmarks {missing} (or set eval.toy_world for the toy world)")
    return [Benchmark(name, *data[name]) for name in config.eval.benchmarks]


def evaluated_model(job: Job, model_path: str | None = None, modules: str | None = None) -> ModelSpec:
    """The model ``job``'s evaluation runs (``model_path`` and ``modules``, what a training produced, override
    ``model.name_or_path`` and ``eval.modules``; after the ``region_focus`` stage, ``modules`` is its Region Focus
    Module, which overrides ``eval.lrs_vqa.region_focus``), checked against its settings without any cluster work:
    ``ValueError`` (``FileNotFoundError`` for missing modules) when it cannot run them. The stages of the
    training-free methods are the modules' when given, else ``pruning``'s."""
    config = job.config
    ev, model_path, modules = config.eval, model_path or config.model.name_or_path, modules or config.eval.modules
    focus = ev.lrs_vqa.region_focus if ev.lrs_vqa else None
    if config.stage.method == PYRAMID and modules is not None:  # the region_focus stage's export: LRS-VQA's module
        focus, modules = modules, None
    if model_path == TOY:
        raise ValueError("model.name_or_path=toy: give the trained toy model's directory (saved by jobs/train.py)")
    check_modules(ev.methods, modules)
    pruning = read_pruning_config(local_copy(modules)) if modules else config.pruning
    for schedule in ev.schedules:
        pruning.check_ratios(schedule)
    m = config.model
    if focus is not None:
        region_focus_layers(local_copy(focus))  # not a saved module: fails here
    return ModelSpec(
        model_path,
        modules,
        pruning,
        m.dtype,
        m.attn_implementation,
        m.processor.options(),
        focus,
        ev.flops_image_size,
    )


def evaluate(
    job: Job,
    model_path: str | None = None,
    modules: str | None = None,
    parent_run_id: str | None = None,
) -> list[SettingResult]:
    """Every setting of ``job.config.eval`` (methods x schedules) on its benchmarks, answered in one pass per
    benchmark, one MLflow run each (:func:`run_settings`), with the model of :func:`evaluated_model`. Ray must be
    initialized (or is started locally by Ray Data)."""
    config = job.config
    ev, model = config.eval, evaluated_model(job, model_path, modules)
    model_path, modules = model.name_or_path, model.modules
    # The images the preprocessing tasks read, where every node reads them (copied to run.storage_path when only
    # this node has them; the model likewise, where it crosses: InferenceOptions.storage_path, timed_settings).
    storage = config.run.storage_path
    benchmarks = [
        replace(b, image_root=for_every_node(b.image_root, f"eval.data.{b.name}.image_root", storage))
        for b in benchmarks_from_config(config)
    ]
    options = InferenceOptions(
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        num_actors=ev.num_actors,
        use_gpu=ev.use_gpu,
        cpus_per_actor=ev.cpus_per_actor,
        max_questions=ev.max_questions,
        storage_path=storage,
    )
    settings = make_settings(ev.methods, ev.schedules, ev.seed, ev.at_own_layers, ev.lrs_vqa)
    latency = timed_settings(config, model, settings, benchmarks[0])
    logged = json.loads(config.model_dump_json())
    logged["model"]["name_or_path"], logged["eval"]["modules"] = model_path, modules
    if logged["eval"]["lrs_vqa"] is not None:  # after the region_focus stage: the module it exported
        logged["eval"]["lrs_vqa"]["region_focus"] = model.region_focus
    return run_settings(
        model,
        settings,
        benchmarks,
        config.answers_dir,
        options,
        uri=config.mlflow.tracking_uri,
        experiment=config.mlflow.experiment,
        config=logged,
        parent_run_id=parent_run_id,
        latency=latency,
    )


def timed_settings(
    config: JobConfig, model: ModelSpec, settings: Sequence[Setting], benchmark: Benchmark
) -> dict[str, dict[str, float]]:
    """Every setting's latency metrics, timed side by side on ``benchmark``'s first requests
    (``eval.latency_*``; none with ``latency_repeats: 0``). Run first, alone: nothing else of the evaluation runs
    beside it."""
    ev = config.eval
    if not ev.latency_repeats:
        return {}
    timing = LatencyOptions(
        batch_size=ev.latency_batch_size,
        warmup=ev.latency_warmup,
        repeats=ev.latency_repeats,
        max_new_tokens=ev.max_new_tokens,
        use_gpu=ev.use_gpu,
        num_cpus=ev.cpus_per_actor,
    )
    remote = model.for_every_node(config.run.storage_path)  # a Ray task loads it, maybe on another node
    return measure_latency(remote, settings, benchmark.name, benchmark.questions, benchmark.image_root, timing)


def check_modules(methods: Sequence[str], modules: str | None) -> None:
    """A trained method (LVPruning) needs its decision modules: fails naming the method before any work."""
    trained = [m for m in methods if is_trained(m)]
    if trained and modules is None:
        named = ", ".join(map(repr, trained))
        raise ValueError(f"eval.methods has {named} but no decision modules: set eval.modules or --modules DIR")


def format_table(results: Sequence[SettingResult]) -> str:
    """method, ratios, TFLOPs, accuracy per benchmark, mean and its 95% interval, latencies; then accuracy per
    question type."""
    benches = list(dict.fromkeys(b for r in results for b in r.scores))
    head = ["method", "ratios", "tflops", *benches, "mean", "mean_95%_ci", "prefill_ms", "e2e_ms"]
    rows = []
    for r in results:
        m = r.metrics
        ratios = "-".join(f"{x:g}" for x in r.setting.keep_ratios or ()) or "-"
        accuracy = [f"{m.get(f'accuracy/{b}', float('nan')):.2f}" for b in benches] + [f"{m[MEAN]:.2f}"]
        low, high = (m.get(name, float("nan")) for name in interval_names(MEAN))
        latency = [f"{m.get(name, float('nan')):.2f}" for name in (PREFILL_MS, E2E_MS)]
        rows.append([r.setting.method, ratios, f"{m[TFLOPS]:.4g}", *accuracy, f"{low:.2f}-{high:.2f}", *latency])
    lines = _columns([head, *rows])
    for r in results:  # accuracy per question type, where the scorer gives one
        per = [
            f"{k[len('accuracy/') :]} {v:.2f}"
            for k, v in r.metrics.items()
            if k.startswith("accuracy/") and k.count("/") == 2
        ]
        if per:
            lines.append(f"{r.setting.name}: " + ", ".join(per))
    return "\n".join(lines)


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]


def evaluate_command(
    config: JobConfig, config_path: str | None, overrides: Sequence[str], model_path: str, modules: str | None
) -> str:
    """The ``jobs/evaluate.py`` command line that runs only the evaluation a training job would have run after
    training: the job's config file and overrides, then the trained model and modules, the same methods, toy world
    and answers folder (answers written before a failure are reused). Credentials in URLs are left out."""

    def local(path: str) -> str:  # absolute where it is a local path, so the command works from anywhere
        return str(Path(path).resolve()) if Path(path).exists() else path

    argv = ["python", "jobs/evaluate.py", *(["--config", config_path] if config_path else [])]
    argv += ["--model", local(model_path), *(["--modules", local(modules)] if modules else [])]
    argv += [redact(item) for item in overrides]
    argv += [f"eval.methods=[{','.join(config.eval.methods)}]", f"eval.output_dir={local(config.answers_dir)}"]
    if config.eval.toy_world is not None:
        argv.append(f"eval.toy_world={local(config.eval.toy_world)}")
    return shlex.join(argv)
