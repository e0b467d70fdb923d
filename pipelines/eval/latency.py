"""Latency as a user feels it: every setting of one evaluation timed in one process, on the same requests, after
warm-up, with repeats, so that the ratios between settings are stable.

- The requests are the first ``batch_size`` questions of a benchmark that have a usable image, built as the batch
  inference builds them (``pipelines.eval.inference.Preprocessor.request``) and answered greedily
  (``timed_generate``).
- One base model is loaded; the pruning settings share it through one set of decision modules, so the settings
  differ only in what they compute.
- Each round runs every setting once, the order rotated from round to round, so drift (other load, clocks) hits
  all of them alike; the first ``warmup`` rounds are not recorded.
- ``prefill_ms`` is the first forward pass (vision tower, projector, pruned LLM, decision modules), ``e2e_ms`` the
  whole generate call: the wall time a request of the batch waits, not divided by the batch size.

Metrics per setting (MLflow names): ``latency/prefill_ms`` and ``latency/e2e_ms``, medians over the rounds, and
``latency/prefill_ms_iqr``, ``latency/e2e_ms_iqr``, their interquartile ranges (the spread).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from pipelines.conversation import RecordError
from pipelines.eval.inference import Preprocessor, question_text, read_questions, setting_inputs
from pipelines.eval.metrics import E2E_MS, PREFILL_MS
from pipelines.eval.models import ModelSpec, Setting, load_settings, reads_whole_images, timed_generate

logger = logging.getLogger(__name__)

TIMES = {"prefill_ms": PREFILL_MS, "e2e_ms": E2E_MS}  # what is timed -> its metric (and ``<metric>_iqr``)


@dataclass(frozen=True)
class LatencyOptions:
    """What to time: requests per generate call, rounds left out and recorded, tokens, resources of the task."""

    batch_size: int = 1
    warmup: int = 2
    repeats: int = 10
    max_new_tokens: int = 8
    use_gpu: bool = False
    num_cpus: float = 0.5


def summarize(times: Sequence[float]) -> tuple[float, float]:
    """The median and the interquartile range (Python's ``statistics.quantiles``, exclusive method)."""
    if len(times) < 2:
        return float(times[0]), 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def latency_requests(
    benchmark: str, questions: str, image_root: str, processor: Any, options: LatencyOptions, whole: bool = False
) -> dict[str, list[np.ndarray]]:
    """The requests (:meth:`Preprocessor.request`'s keys, one array per prompt each; ``whole``: the pyramid's inputs
    too) of the first ``batch_size`` questions with a usable image; a benchmark with fewer fills the batch by
    repeating them."""
    pre, requests = Preprocessor(processor, image_root, whole), []
    for record in read_questions(questions):
        try:
            requests.append(pre.request(question_text(benchmark, record), str(record.get("image") or "")))
        except RecordError:
            continue
        if len(requests) == options.batch_size:
            break
    if not requests:
        raise ValueError(f"{questions}: no question with a usable image under {image_root} to time")
    take = [requests[i % len(requests)] for i in range(options.batch_size)]
    return {k: [r[k] for r in take] for k in take[0]}


def time_settings(
    spec: ModelSpec,
    settings: Sequence[Setting],
    requests: dict[str, list[np.ndarray]],
    tokenizer: Any,
    options: LatencyOptions,
) -> dict[str, dict[str, float]]:
    """Time every setting in this process (see the module docstring) on ``requests`` (:func:`latency_requests`):
    setting name -> metrics."""
    device = torch.device("cuda" if options.use_gpu and torch.cuda.is_available() else "cpu")
    served = load_settings(spec, settings, device)
    recorded: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in TIMES} for s in settings}
    for r in range(options.warmup + options.repeats):
        shift = r % len(settings)
        for s in [*settings[shift:], *settings[:shift]]:
            model, policy = served[s.name]
            prompts, images = setting_inputs(s, requests)
            _, prefill, e2e = timed_generate(model, tokenizer, prompts, images, s, policy, options.max_new_tokens)
            if r >= options.warmup:
                recorded[s.name]["prefill_ms"].append(prefill)
                recorded[s.name]["e2e_ms"].append(e2e)
    out = {}
    for name, times in recorded.items():
        metrics = {}
        for key, metric in TIMES.items():
            metrics[metric], metrics[f"{metric}_iqr"] = summarize(times[key])
        out[name] = metrics
    return out


def _measure(
    spec: ModelSpec,
    settings: Sequence[Setting],
    benchmark: str,
    questions: str,
    image_root: str,
    options: LatencyOptions,
) -> dict[str, dict[str, float]]:
    processor = spec.processor()
    requests = latency_requests(benchmark, questions, image_root, processor, options, reads_whole_images(settings))
    return time_settings(spec, settings, requests, processor.tokenizer, options)


def measure_latency(
    spec: ModelSpec,
    settings: Sequence[Setting],
    benchmark: str,
    questions: str,
    image_root: str,
    options: LatencyOptions = LatencyOptions(),
) -> dict[str, dict[str, float]]:
    """Latency metrics of every setting, on ``benchmark``'s first requests, measured in one Ray task (one process,
    ``num_cpus`` and a GPU when ``use_gpu``): setting name -> ``latency/...`` metrics."""
    if options.repeats < 1:
        raise ValueError(f"LatencyOptions.repeats must be at least 1, got {options.repeats}")
    rounds = f"{options.warmup} + {options.repeats} rounds"
    logger.info("latency: %d settings, batch %d, %s, in one process", len(settings), options.batch_size, rounds)
    # "DEFAULT": outside any placement group it was called from (a sweep trial's holds 0.01 CPU), as Ray Data's are
    resources = {"num_cpus": options.num_cpus, "num_gpus": 1 if options.use_gpu else 0}
    task = ray.remote(_measure).options(scheduling_strategy="DEFAULT", **resources)
    return ray.get(task.remote(spec, list(settings), benchmark, questions, image_root, options))
