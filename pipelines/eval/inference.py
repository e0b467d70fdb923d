"""Batch inference with Ray Data: a LLaVA question file in, one LLaVA answer file per inference setting out, every
setting answered in one pass.

1. Driver: read the questions (jsonl, local or ``s3://``), and for each setting drop those already answered in its
   file (resume, per setting); take each remaining question's text with the benchmark's suffix
   (:func:`question_text`) and the settings that still need it.
2. Preprocess (Ray Data tasks, :class:`Preprocessor`), once for all settings: each question's request as LLaVA's
   ``model_vqa_loader.py`` builds it: its text inside the model's conversation template (vicuna_v1 for LLaVA-1.5,
   the processor's chat template for LLaVA-NeXT / OneVision and Qwen-VL), its image read, decoded and
   square-padded (LLaVA-1.5's ``pad``; the tiled families and Qwen-VL take it as it is), through the processor. A
   question without a usable image gets its reason (``pipelines.images.IMAGE_SKIPS``) instead of failing the run;
   it gets no answer and is reported.
3. Generate (``map_batches``, ``ActorPoolStrategy(size=num_actors)``): each actor loads the base model and the
   decision modules once, holds one policy per setting, and answers each preprocessed batch under every setting
   that needs it, decoding greedily, several left-padded samples per generate call.
4. Driver: append each finished batch to each setting's answers file (flushed, fsynced), so an interrupted run
   (an actor or the driver killed) resumes from what was written and writes nothing twice; at the end, rewrite each
   file in question order (POPE pairs answers with labels by order).

Timing per sample (ms, in each answer's ``metadata``): ``e2e_ms`` and ``prefill_ms`` of the batch's generate call
under its setting (``pipelines.eval.models.timed_generate``; image loading and preprocessing excluded), divided by
the batch size (``batch_size`` is recorded): the amortized cost per sample while answering, beside other work. The
latencies an evaluation logs are measured apart, all settings in one process: ``pipelines.eval.latency``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from lvpruning.policies import NONE, PYRAMID
from pipelines import storage
from pipelines.conversation import (
    SIZE_KEYS,
    WHOLE_BLANK,
    RecordError,
    blank_image,
    image_inputs,
    prompt_template,
    single_turn_prompt,
    whole_image_inputs,
)
from pipelines.eval.datasets import SHORT_ANSWER, build_prompt, with_suffix
from pipelines.eval.models import ModelSpec, Setting, load_settings, reads_whole_images, timed_generate
from pipelines.eval.scoring import TOY_BENCHMARK
from pipelines.eval.scoring.common import index_questions
from pipelines.images import load_image, square_background

logger = logging.getLogger(__name__)

PREPROCESS_CPUS = 0.5  # per preprocessing task
TIMES = ("prefill_ms", "e2e_ms")  # per answer, ms


@dataclass(frozen=True)
class InferenceOptions:
    """How to run: batch and pool sizes, resources per actor, question limit."""

    batch_size: int = 16
    max_new_tokens: int = 8
    num_actors: int = 2
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: float = 0.5  # room for the preprocessing tasks: benchmarks/RESULTS.md, "CPU defaults"
    max_questions: int | None = None  # the first N questions of the file
    storage_path: str | None = None  # where the model goes when other nodes cannot read it (run.storage_path)


@dataclass
class InferenceReport:
    """What one :func:`run_inference` did. ``resumed``: answers already in the file; ``skipped``: questions
    left without an answer, by reason, with their ids in ``skipped_ids``."""

    benchmark: str
    answers: str
    questions: int
    resumed: int
    generated: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def question_text(benchmark: str, record: dict[str, Any]) -> str:
    """The question as LLaVA-1.5 sends it (suffix included); the toy world uses the short-answer suffix."""
    if benchmark.strip().lower() == TOY_BENCHMARK:
        return with_suffix(str(record["text"]), SHORT_ANSWER)
    return build_prompt(benchmark, record)


def read_questions(path: str) -> list[dict[str, Any]]:
    """The records of a LLaVA question jsonl (local or ``s3://``); a bad line (not UTF-8, not JSON) or a repeated id
    is an error naming the file and line."""
    lines = storage.read_bytes(path).splitlines()
    numbered = [(n, storage.load_json(line, path, n)) for n, line in enumerate(lines, start=1) if line.strip()]
    return [record for _, record in index_questions(path, numbered).values()]


def read_answers(path: Path, expected: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Answers already in ``path`` by question id. A torn last line (a run killed mid-write) is cut off; an
    answer written under other settings (``expected`` items of its metadata, or another model) is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    out = {}
    lines = enumerate(data.splitlines(), start=1)
    for n, record in ((n, storage.load_json(line, str(path), n)) for n, line in lines if line.strip()):
        found = {k: record.get("metadata", {}).get(k) for k in expected} | {"model_id": record.get("model_id")}
        if found != expected:
            raise ValueError(f"{path}:{n}: an answer of {found}, but this run is {expected}; use another folder")
        out[str(record["question_id"])] = record
    return out


# ------------------------------------------------------------------------------------------- preprocessing


class Preprocessor:
    """Questions and their images -> model inputs (:meth:`request`), as the model's own evaluation builds them: the
    batch inference's Ray Data tasks, the latency's and the calibration's requests. ``whole``: also the inputs of
    LRS-VQA's pyramid (:func:`pipelines.conversation.whole_image_inputs`, keys ``whole_*``), for ``lrs_vqa``."""

    def __init__(self, processor: Any, image_root: str, whole: bool = False) -> None:
        self.processor, self.image_root, self.whole = processor, image_root, whole
        self.template = prompt_template(processor)
        self.background = square_background(processor)
        self.blank = blank_image(processor) | (WHOLE_BLANK if whole else {})  # rows with no image: input shapes

    def request(self, question: str, image: str) -> dict[str, np.ndarray]:
        """One question's ``input_ids`` (L,), its single-turn prompt with the image token, and its image's inputs
        (``image_root``-relative; :func:`pipelines.conversation.image_inputs`: ``pixel_values`` (3, H, W) padded to a
        square of the processor's mean colour, or for the tiled families (S, 3, H, W) and ``image_sizes`` (2,), or
        Qwen-VL's (P, D) and ``image_grid_thw`` (3,)); ``RecordError`` (a reason of
        ``pipelines.images.IMAGE_SKIPS``) when the image cannot be used."""
        picture = load_image(self.image_root, image, self.background)
        prompt = single_turn_prompt(question, template=self.template)
        encoded = self.processor(text=[prompt], images=[picture], return_tensors="np")
        whole = whole_image_inputs(self.processor, prompt, picture) if self.whole else {}
        return {"input_ids": np.asarray(encoded["input_ids"][0], dtype=np.int64)} | image_inputs(encoded) | whole

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Rows (index, image, question[, settings]) -> (index, error, input_ids, pixel_values[, its size key][,
        settings]): a row whose image cannot be used has its reason as ``error``, no ids and a blank image; the
        settings that need the row (:func:`run_inference`) pass through."""
        out: dict[str, list[Any]] = {"index": [], "error": [], "input_ids": [], **{k: [] for k in self.blank}}
        for index, image, question in zip(batch["index"].tolist(), batch["image"], batch["question"]):
            try:
                row = {"index": index, "error": ""} | self.request(str(question), str(image))
            except RecordError as e:
                row = {"index": index, "error": e.reason, "input_ids": np.zeros(0, dtype=np.int64)} | self.blank
            for name, value in row.items():
                out[name].append(value)
        return out | ({"settings": batch["settings"]} if "settings" in batch else {})


_PREPROCESSORS: dict[tuple[str, str, bool], Preprocessor] = {}


def _preprocess(batch: dict[str, np.ndarray], *, processor_ref: Any, image_root: str, whole: bool) -> dict[str, Any]:
    key = (processor_ref.hex(), image_root, whole)
    if key not in _PREPROCESSORS:  # Ray reuses worker processes: unpickle the processor once per process
        _PREPROCESSORS.clear()
        _PREPROCESSORS[key] = Preprocessor(ray.get(processor_ref), image_root, whole)
    return _PREPROCESSORS[key](batch)


def setting_inputs(
    setting: Setting, rows: dict[str, Sequence[Any]]
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The prompts and images of ``rows`` (:meth:`Preprocessor.request`'s keys, one list each) that ``setting``
    reads: the pyramid's whole images for ``lrs_vqa``, the processor's for every other."""
    prefix = "whole_" if setting.method == PYRAMID else ""
    keys = ("pixel_values", *SIZE_KEYS)
    images = {key: list(rows[prefix + key]) for key in keys if prefix + key in rows}
    return list(rows[prefix + "input_ids"]), images


# ---------------------------------------------------------------------------------------------- generation


class Generator:
    """The Ray Data actor: one base model and one set of decision modules serving every setting; batches of
    preprocessed rows, each with the settings that still need it -> one answer row per (question, setting)."""

    def __init__(
        self, spec: ModelSpec, settings: Sequence[Setting], processor: Any, max_new_tokens: int, use_gpu: bool
    ):
        if isinstance(processor, ray.ObjectRef):
            processor = ray.get(processor)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.settings, self.tokenizer, self.max_new_tokens = list(settings), processor.tokenizer, max_new_tokens
        self.served = load_settings(spec, self.settings, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        needs = [{int(k) for k in str(todo).split(",")} for todo in batch["settings"]]
        keys = ("index", "setting", "error", "text", "pyramid", *TIMES, "batch_size")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        for k, setting in enumerate(self.settings):
            rows = [i for i, need in enumerate(needs) if k in need]
            ok = [i for i in rows if not batch["error"][i]]
            texts, prefill_ms, e2e_ms = [""] * len(rows), 0.0, 0.0
            pyramid: list[dict[str, Any]] = [{} for _ in rows]
            if ok:  # per sample: the batch's times amortized
                prompts, images = setting_inputs(setting, {key: [batch[key][i] for i in ok] for key in batch})
                model, policy = self.served[setting.name]
                prefill: list[Any] = []
                answered, prefill_ms, e2e_ms = timed_generate(
                    model, self.tokenizer, prompts, images, setting, policy, self.max_new_tokens, prefill
                )
                for n, (i, text) in enumerate(zip(ok, answered, strict=True)):
                    texts[rows.index(i)] = text
                    if setting.method == PYRAMID:
                        pyramid[rows.index(i)] = pyramid_record(prefill[0], n)
            for i, text, tiles in zip(rows, texts, pyramid, strict=True):
                out["pyramid"].append(json.dumps(tiles))
                out["index"].append(int(batch["index"][i]))
                out["setting"].append(k)
                out["error"].append(str(batch["error"][i]))
                out["text"].append(text)
                out["prefill_ms"].append(prefill_ms / max(len(ok), 1))
                out["e2e_ms"].append(e2e_ms / max(len(ok), 1))
                out["batch_size"].append(len(ok))
        return {k: np.asarray(v, dtype=object if k in ("error", "text", "pyramid") else None) for k, v in out.items()}


def pyramid_record(output: Any, b: int) -> dict[str, Any]:
    """What an answer records of sample ``b`` of the pyramid's prefill (``PyramidOutput``): the tower passes it
    made (``tiles_encoded``) against the finest level it reached whole (``tiles_finest``), the prompt's length at
    each scoring round then the LLM's (``rounds``) and the image's tokens in the LLM's prompt (``vision_tokens``):
    what its FLOPs are counted from (:func:`lvpruning.lrs_vqa.pyramid_flops`)."""
    keys = ("tiles_encoded", "tiles_finest", "vision_tokens")
    return {k: int(getattr(output, k)[b]) for k in keys} | {"rounds": output.rounds[b].tolist()}


# ------------------------------------------------------------------------------------------------ pipeline


def run_inference(
    benchmark: str,
    questions: str,
    image_root: str,
    answers: Mapping[Setting, str | Path],
    model: ModelSpec,
    options: InferenceOptions = InferenceOptions(),
    processor: Any = None,
) -> dict[str, InferenceReport]:
    """Answer ``questions`` (LLaVA jsonl; images under ``image_root``, local or ``s3://``) under every setting of
    ``answers`` (setting -> its local answers jsonl) in one pass: each question is preprocessed once and answered
    under each setting that has no answer for it in its file yet. ``processor`` defaults to the model's own
    (:meth:`ModelSpec.processor`). Returns each setting's report by setting name."""
    t0 = time.perf_counter()
    settings, files = list(answers), [Path(a) for a in answers.values()]
    for path in files:
        if storage.is_s3(str(path)):
            raise ValueError(f"answers {path}: the answers file is appended locally; sync it to S3 afterwards")
        path.parent.mkdir(parents=True, exist_ok=True)
    records = read_questions(questions)[: options.max_questions]
    signatures = [answer_signature(model, s) for s in settings]
    done = [set(read_answers(path, expected)) for path, expected in zip(files, signatures, strict=True)]
    reports = [
        InferenceReport(benchmark, str(path), len(records), sum(str(r["question_id"]) in ids for r in records), 0)
        for path, ids in zip(files, done, strict=True)
    ]
    needs = {
        i: ",".join(str(k) for k, answered in enumerate(done) if str(r["question_id"]) not in answered)
        for i, r in enumerate(records)
    }
    todo = {i: need for i, need in needs.items() if need}
    answers_left = sum(len(need.split(",")) for need in todo.values())
    logger.info(
        "%s: %d questions x %d settings in one pass, %d answers to write (%d questions)",
        benchmark,
        len(records),
        len(settings),
        answers_left,
        len(todo),
    )
    if todo:
        if processor is None:
            processor = model.processor()
        rows = [
            {"index": i, "image": str(records[i].get("image") or ""), "question": question_text(benchmark, records[i])}
            | {"settings": need}
            for i, need in todo.items()
        ]
        ds = _dataset(rows, processor, image_root, model, settings, options)
        handles = [open(path, "a", encoding="utf-8") for path in files]
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                _append(handles, batch, records, [sig | {"benchmark": benchmark} for sig in signatures], done, reports)
        finally:
            for f in handles:
                f.close()
    seconds = time.perf_counter() - t0
    for s, path, report in zip(settings, files, reports, strict=True):
        _rewrite_in_question_order(path, records)
        report.seconds = seconds
        if report.skipped:
            logger.warning("%s %s: no answer for %s (ids %s)", benchmark, s.name, report.skipped, report.skipped_ids)
    return {s.name: report for s, report in zip(settings, reports, strict=True)}


def weights_version(path: str | None) -> str | None:
    """Which version of the weights a local model or modules folder holds: a hash of its weight files' names,
    sizes and modification times (retraining into the same folder changes it); None for hub ids and ``s3://``."""
    if path is None or storage.is_s3(path) or not Path(path).is_dir():
        return None
    files = sorted(f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    stamp = "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def answer_signature(model: ModelSpec, setting: Setting) -> dict[str, Any]:
    """What an answer file records of its model and setting (``model_id`` + metadata), checked on resume: the
    paths and the versions of the weights, so answers of an earlier model trained into the same folder are
    never taken for this one's, and the processor's options (``model.processor``: Qwen-VL's pixel bounds)."""
    modules = {NONE: None, PYRAMID: model.region_focus}.get(setting.method, model.modules)  # the weights it read
    return {
        "model_id": model.model_id,
        "model": model.name_or_path,
        "model_version": weights_version(model.name_or_path),
        "modules": modules,
        "modules_version": weights_version(modules),
        "processor": dict(model.processor_options) or None,
        **setting.metadata(),
    }


def _rewrite_in_question_order(path: Path, records: list[dict[str, Any]]) -> None:
    path.touch()  # a benchmark whose every image is missing still gets its (empty) answer file
    lines = {str(json.loads(line)["question_id"]): line for line in path.read_text("utf-8").splitlines() if line}
    ordered = [lines.pop(str(r["question_id"])) for r in records if str(r["question_id"]) in lines]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in ordered + list(lines.values())), encoding="utf-8")
    os.replace(tmp, path)


def _dataset(
    rows: list[dict],
    processor: Any,
    image_root: str,
    model: ModelSpec,
    settings: Sequence[Setting],
    options: InferenceOptions,
) -> ray.data.Dataset:
    """Preprocessing tasks, then the generating actor pool; one batch per block, so answers stream out early."""
    ref, size = ray.put(processor), options.batch_size
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // size)))
    pre = {"processor_ref": ref, "image_root": image_root, "whole": reads_whole_images(settings)}
    ds = ds.map_batches(_preprocess, fn_kwargs=pre, batch_size=size, batch_format="numpy", num_cpus=PREPROCESS_CPUS)
    remote = model.for_every_node(options.storage_path)  # the actors may be on other nodes
    actor = {"spec": remote, "settings": list(settings), "processor": ref, "max_new_tokens": options.max_new_tokens}
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs=actor | {"use_gpu": options.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=options.num_actors),
        batch_size=size,
        batch_format="numpy",
        num_cpus=options.cpus_per_actor,
        num_gpus=1 if options.use_gpu else 0,
    )


def _append(
    files: list[Any],
    batch: dict[str, np.ndarray],
    records: list[dict],
    metas: list[dict],
    written: list[set[str]],
    reports: list[InferenceReport],
) -> None:
    """Write one finished batch's answers, each to its setting's file in LLaVA's answer format, on disk before
    the next batch is read. ``written``: each setting's answered question ids (an answer is never written twice)."""
    touched = set()
    for j, index in enumerate(batch["index"].tolist()):
        k, record, error = int(batch["setting"][j]), records[index], str(batch["error"][j])
        qid, report, meta = str(record["question_id"]), reports[k], metas[k]
        if error:
            report.skipped[error] = report.skipped.get(error, 0) + 1
            report.skipped_ids.append(record["question_id"])
            continue
        if qid in written[k]:
            continue
        timing = {key: batch[key][j].item() for key in (*TIMES, "batch_size")}
        answer = {"question_id": record["question_id"], "prompt": question_text(meta["benchmark"], record)}
        answer |= {"text": str(batch["text"][j]), "answer_id": uuid.uuid4().hex, "model_id": meta["model_id"]}
        answer["metadata"] = {key: v for key, v in meta.items() if key != "model_id"} | timing
        pyramid = json.loads(str(batch["pyramid"][j]))
        if pyramid:  # lrs_vqa: the tiles it encoded and its prompt lengths
            answer["metadata"]["pyramid"] = pyramid
        files[k].write(json.dumps(answer, ensure_ascii=False) + "\n")
        written[k].add(qid)
        report.generated += 1
        touched.add(k)
    for k in touched:
        files[k].flush()
        os.fsync(files[k].fileno())
