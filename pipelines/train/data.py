"""LLaVA instruction data -> model inputs with Ray Data, skipping and counting every unusable record.

Two stages; each image is read once:

1. Text (on the driver, no image opened): read the annotation file (a ``.json`` list or ``.jsonl``, local
   or ``s3://``), validate each conversation and render its ``vicuna_v1`` prompt. Counted here:
   ``text_only``, ``malformed_conversation``, ``bad_image_placeholder``. Fails at once if these already
   pass the threshold.
2. Encode (Ray Data ``map_batches`` tasks, parallel and streaming; each worker process unpickles the
   processor once and reuses it): per record, check the length after image expansion (``too_long``,
   before the image is read), read and decode the image (``missing_image``, ``corrupt_image``), pad it
   to a square as LLaVA-1.5 trains (``--image_aspect_ratio pad``), then run the model's own processor and
   mask the labels (``pipelines.conversation.encode``). Unusable records are dropped in the stage and
   reported to a small counter actor, so the counts grow while the dataset streams into the trainer:
   620k records of (3, 336, 336) float32 pixels are ~840 GB, too much to materialize for a counting pass.

``prepare_instruct_rows`` is the text stage and returns ``InstructRows``; its ``encode(indices)`` is the encode
stage over any list of records, in that order: each training worker encodes its own stream
(``pipelines.train.order``). ``build_instruct_dataset`` is the two in a row, over the whole file.

``text_only`` records (no ``image`` key, ~40k of LLaVA-665k) are skipped on purpose, as the paper trains
on image records only: they are counted but are not errors. Every other reason is an error, and the
pipeline fails with a ``ValueError`` naming all counts when the errors pass ``max_bad_fraction`` of the
image records (default 1%: a complete LLaVA-665k download loses far fewer; more points at a wrong image
root or a broken download). Errors only ever grow, so the encode stage fails as soon as the threshold is
passed, mid-stream, with no false alarm.

Shapes: B = batch, T = longest sequence in a batch, L = one row's length, H = W = vision image size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines import storage
from pipelines.conversation import (
    MODEL_INPUTS,
    VICUNA_V1,
    ChatTemplate,
    ConversationTemplate,
    Prompt,
    RecordError,
    count_image_tokens,
    encode,
    parse_turns,
    prompt_template,
    render,
    size_key,
    text_length,
)
from pipelines.images import load_image, square_background

logger = logging.getLogger(__name__)

RECORD_SKIPS = (
    "text_only",
    "malformed_conversation",
    "bad_image_placeholder",
    "too_long",
    "missing_image",
    "corrupt_image",
)
# Dropped on purpose (the paper trains on image records only): counted, but not errors.
EXPECTED_SKIPS = frozenset({"text_only"})
DEFAULT_MAX_BAD_FRACTION = 0.01


@dataclass(frozen=True)
class SkipStats:
    """What happened to the records of one annotation file.

    ``pending`` counts records still waiting for the encode stage: the counts are final once it is 0,
    i.e. after one full pass over the dataset (one epoch, or ``materialize()``).
    """

    total: int
    counts: Mapping[str, int]  # every reason of RECORD_SKIPS, 0 when none
    kept: int
    pending: int
    max_bad_fraction: float

    @property
    def errors(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason not in EXPECTED_SKIPS)

    @property
    def image_records(self) -> int:
        """The denominator of the threshold: records that should have been usable."""
        return self.total - sum(self.counts[reason] for reason in EXPECTED_SKIPS)

    @property
    def over_threshold(self) -> bool:
        return self.errors > self.max_bad_fraction * self.image_records

    def summary(self) -> str:
        skipped = ", ".join(f"{reason}={n}" for reason, n in self.counts.items() if n)
        pending = f", {self.pending} pending" if self.pending else ""
        return f"{self.total} records, {self.kept} kept{pending}, skipped: {skipped or 'none'}"

    def check(self) -> SkipStats:
        """Raise ``ValueError`` if the errors pass the threshold; return ``self`` otherwise."""
        if self.over_threshold:
            fraction = self.errors / max(self.image_records, 1)
            raise ValueError(
                f"too many unusable records: {self.errors} errors in {self.image_records} image records "
                f"({fraction:.2%} > max_bad_fraction={self.max_bad_fraction:.2%}); {self.summary()}"
            )
        return self


@ray.remote(num_cpus=0)
class _SkipTally:
    """Collects the encode stage's verdicts by record index: retries and later epochs do not count twice."""

    def __init__(self, total: int, text_counts: dict[str, int], n_encode: int, max_bad_fraction: float) -> None:
        self.total, self.text_counts, self.n_encode = total, text_counts, n_encode
        self.max_bad_fraction = max_bad_fraction
        self.seen = np.zeros(total, dtype=bool)
        self.skipped: dict[int, str] = {}
        self.logged: Counter[str] = Counter()
        self.reported_done = False

    def report(self, kept: list[int], skipped: dict[int, tuple[str, str]]) -> SkipStats:
        for index, (reason, message) in skipped.items():
            if self.logged[reason] < 5:  # the first few of each reason, with the record and the cause
                self.logged[reason] += 1
                logger.warning("skipping record %d (%s): %s", index, reason, message)
            self.skipped[index] = reason
        self.seen[kept] = True
        self.seen[list(skipped)] = True
        stats = self.stats()
        if stats.pending == 0 and not self.reported_done:
            self.reported_done = True
            logger.warning("instruction data, encode stage done: %s", stats.summary())
        return stats

    def stats(self) -> SkipStats:
        counts = Counter(self.text_counts) + Counter(self.skipped.values())
        n_seen = int(self.seen.sum())
        return SkipStats(
            total=self.total,
            counts={reason: counts[reason] for reason in RECORD_SKIPS},
            kept=n_seen - len(self.skipped),
            pending=self.n_encode - n_seen,
            max_bad_fraction=self.max_bad_fraction,
        )


class SkipLedger:
    """The driver's handle on the counts: text-stage ones are final, encode-stage ones grow as rows stream."""

    def __init__(self, tally: Any) -> None:
        self._tally = tally

    def stats(self) -> SkipStats:
        return ray.get(self._tally.stats.remote())

    def check(self) -> SkipStats:
        """Log the counts; raise ``ValueError`` if over the threshold (final after one full pass)."""
        stats = self.stats()
        logger.info("instruction data: %s", stats.summary())
        return stats.check()


def read_records(path: str) -> list[Any]:
    """The records of a LLaVA instruction file: a JSON list, or one JSON object per line for ``.jsonl``.

    A ``.jsonl`` line that is not UTF-8 or not JSON becomes ``None`` (counted as malformed; the first few are
    logged with their line); a ``.json`` file that is not UTF-8, not JSON or not a list fails, naming the file.
    """
    data = storage.read_bytes(path)
    if path.endswith(".jsonl"):
        records: list[Any] = []
        unreadable = 0
        for n, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(storage.load_json(line, path, n))
                except ValueError as e:
                    records.append(None)
                    unreadable += 1
                    if unreadable <= 5:
                        logger.warning("skipping a malformed record: %s", e)
        return records
    records = storage.load_json(data, path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def prepare_record(
    index: int, record: Any, template: ConversationTemplate | ChatTemplate = VICUNA_V1
) -> dict[str, Any]:
    """The encode stage's input row for one record, or ``RecordError`` naming why it cannot be used."""
    if not isinstance(record, dict):
        raise RecordError("malformed_conversation", f"record is a {type(record).__name__}, not an object")
    if "image" not in record:
        raise RecordError("text_only", "no image")
    if not isinstance(record["image"], str) or not record["image"]:
        raise RecordError("malformed_conversation", f"image is {record['image']!r}, not a relative path")
    prompt = render(parse_turns(record.get("conversations")), template)
    return {
        "index": index,
        "id": str(record.get("id", index)),
        "image": record["image"],
        "text": prompt.text,
        "span_starts": [start for start, _ in prompt.answer_spans],
        "span_ends": [end for _, end in prompt.answer_spans],
    }


class _Encoder:
    """Rows in, model inputs out: the processor and what is derived from it, built once per worker process."""

    def __init__(self, processor: Any, image_root: str, max_length: int) -> None:
        self.processor, self.image_root, self.max_length = processor, image_root, max_length
        self.n_image_tokens = count_image_tokens(processor)  # None: it depends on the image (tiles, Qwen-VL)
        self.background = square_background(processor)
        self.size_key = size_key(processor)

    def __call__(
        self, batch: dict[str, np.ndarray]
    ) -> tuple[dict[str, list[Any]], list[int], dict[int, tuple[str, str]]]:
        """(model-input columns of the usable rows, their indices, {index: (reason, message)} of the rest)."""
        out: dict[str, list[Any]] = {name: [] for name in ("index", "id", *MODEL_INPUTS)}
        if self.size_key is not None:
            out[self.size_key] = []
        kept: list[int] = []
        skipped: dict[int, tuple[str, str]] = {}
        for i, index in enumerate(batch["index"].tolist()):
            try:
                row = self._encode_row(batch, i)
            except RecordError as e:
                skipped[index] = (e.reason, f"id={batch['id'][i]}: {e}")
                continue
            kept.append(index)
            for name, value in (("index", index), ("id", str(batch["id"][i])), *row.items()):
                out[name].append(value)
        return out, kept, skipped

    def _encode_row(self, batch: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
        spans = zip(batch["span_starts"][i].tolist(), batch["span_ends"][i].tolist(), strict=True)
        prompt = Prompt(text=str(batch["text"][i]), answer_spans=tuple(spans))
        if self.n_image_tokens is not None:  # too long before the image is read, where its tokens are known
            length = text_length(self.processor, prompt, self.n_image_tokens)
            if length > self.max_length:
                raise RecordError("too_long", f"{length} tokens > max_length={self.max_length}")
        image = self._load_image(str(batch["image"][i]))
        row = encode(self.processor, prompt, image)
        if len(row["input_ids"]) > self.max_length:  # the processor is the authority on the length
            raise RecordError("too_long", f"{len(row['input_ids'])} tokens > max_length={self.max_length}")
        return row

    def _load_image(self, relative: str) -> Any:
        return load_image(self.image_root, relative, self.background)  # LLaVA-1.5 pads to a square, tiles do not


_ENCODERS: dict[tuple[Any, ...], _Encoder] = {}


def _encode_batch(
    batch: dict[str, np.ndarray],
    *,
    processor_ref: ray.ObjectRef,
    image_root: str,
    max_length: int,
    tally: Any,
) -> dict[str, list[Any]]:
    """The encode stage's Ray Data task: encode a batch, report its skips, fail past the threshold."""
    key = (processor_ref.hex(), image_root, max_length)
    if key not in _ENCODERS:  # once per worker process (which Ray reuses): a tokenizer is slow to unpickle
        while len(_ENCODERS) >= 4:
            _ENCODERS.pop(next(iter(_ENCODERS)))
        _ENCODERS[key] = _Encoder(ray.get(processor_ref), image_root, max_length)
    out, kept, skipped = _ENCODERS[key](batch)
    stats = ray.get(tally.report.remote(kept, skipped))
    stats.check()  # errors only grow: past the threshold now means past it at the end
    return out


@dataclass(frozen=True)
class InstructRows:
    """The text stage's output, for the encode stage wherever it runs (the driver, or each training worker on its
    own stream): the usable rows in a Ray object, and what encoding them needs. Picklable (object refs and the tally
    actor's handle), so it travels to the workers in ``train_loop_config``."""

    rows: ray.ObjectRef  # list of ``prepare_record`` rows, in file order
    indices: tuple[int, ...]  # their record indices, in file order
    processor: ray.ObjectRef
    image_root: str
    max_length: int
    tally: Any  # the _SkipTally actor: skips are counted once per record index, wherever they are found
    batch_size: int = 16
    concurrency: int | None = None
    num_cpus: float = 1.0

    def __len__(self) -> int:
        return len(self.indices)

    def encode(self, indices: list[int] | None = None, preserve_order: bool = True) -> ray.data.Dataset:
        """A lazy dataset of model inputs for the records ``indices`` (default: all, in file order), in that order
        unless ``preserve_order=False`` (faster streaming); encode tasks take ``num_cpus`` each, at most
        ``concurrency`` at once (default: as many as the cluster fits)."""
        rows = _cached_rows(self.rows)
        chosen = list(rows.values()) if indices is None else [rows[i] for i in indices]
        # Blocks of at most 4 batches, and enough of them for every task slot to get work.
        batch_size = self.batch_size
        slots = self.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // self.num_cpus))
        n_blocks = max(math.ceil(len(chosen) / (4 * batch_size)), min(math.ceil(len(chosen) / batch_size), 2 * slots))
        ds = ray.data.from_items(chosen, override_num_blocks=max(1, n_blocks))
        ds = ds.map_batches(
            _encode_batch,
            fn_kwargs={
                "processor_ref": self.processor,
                "image_root": self.image_root,
                "max_length": self.max_length,
                "tally": self.tally,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=self.concurrency,
            num_cpus=self.num_cpus,
        )
        ds.context.execution_options.preserve_order = preserve_order
        ds.context.raise_original_map_exception = True  # the threshold's ValueError, not a UserCodeException
        return ds


_ROWS: dict[str, dict[int, dict[str, Any]]] = {}


def _cached_rows(ref: ray.ObjectRef) -> dict[int, dict[str, Any]]:
    """The rows behind ``ref`` by record index, fetched once per process (a worker encodes one stream per epoch)."""
    key = ref.hex()
    if key not in _ROWS:
        _ROWS.clear()
        _ROWS[key] = {row["index"]: row for row in ray.get(ref)}
    return _ROWS[key]


def prepare_instruct_rows(
    data_path: str,
    image_root: str,
    processor: Any,
    *,
    max_length: int = 2048,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    template: ConversationTemplate | ChatTemplate | None = None,
    batch_size: int = 16,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
) -> tuple[InstructRows, SkipLedger]:
    """The text stage (on the driver): a LLaVA instruction file's usable rows, ready to encode, and the ledger of
    its skips. Text-stage errors past ``max_bad_fraction`` raise ``ValueError`` here, encode-stage ones while a
    dataset of ``InstructRows.encode`` is consumed."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    records = read_records(data_path)
    template = template or prompt_template(processor)
    rows: list[dict[str, Any]] = []
    text_counts: Counter[str] = Counter()
    for index, record in enumerate(records):
        try:
            rows.append(prepare_record(index, record, template))
        except RecordError as e:
            text_counts[e.reason] += 1
    del records

    total = len(rows) + sum(text_counts.values())
    counts = {reason: text_counts[reason] for reason in RECORD_SKIPS}
    stats = SkipStats(total, counts, kept=0, pending=len(rows), max_bad_fraction=max_bad_fraction)
    logger.info("instruction data %s, text stage: %s", data_path, stats.summary())
    stats.check()  # the encode stage can only add errors
    # On the driver's node: the encode tasks of every worker report to it, and it must outlive any other node (a
    # spot node lost mid-run took the tally with it, and every later encode task with it).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tally = _SkipTally.options(scheduling_strategy=here).remote(total, dict(text_counts), len(rows), max_bad_fraction)
    data = InstructRows(
        rows=ray.put(rows),
        indices=tuple(row["index"] for row in rows),
        processor=ray.put(processor),
        image_root=image_root,
        max_length=max_length,
        tally=tally,
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
    return data, SkipLedger(tally)


def build_instruct_dataset(
    data_path: str,
    image_root: str,
    processor: Any,
    *,
    max_length: int = 2048,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    template: ConversationTemplate | ChatTemplate | None = None,
    batch_size: int = 16,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
    preserve_order: bool = True,
) -> tuple[ray.data.Dataset, SkipLedger]:
    """A lazy ``ray.data.Dataset`` of model inputs for a LLaVA instruction file, and the ledger of its skips: the
    text stage (``prepare_instruct_rows``), then the encode stage over every usable row (``InstructRows.encode``).

    Rows: ``index`` (position in the file), ``id``, ``input_ids`` / ``attention_mask`` / ``labels`` (L,)
    int64, ``pixel_values`` (3, H, W) float32 (tiled families: (S, 3, H, W) and ``image_sizes`` (2,); Qwen-VL: (P, D)
    and ``image_grid_thw`` (3,)).
    ``image_root`` is a folder or ``s3://bucket/prefix``; ``processor`` is the model's processor, ``template``
    by default its model's (:func:`pipelines.conversation.prompt_template`). Rows keep the file's order unless
    ``preserve_order=False``.
    """
    data, ledger = prepare_instruct_rows(
        data_path,
        image_root,
        processor,
        max_length=max_length,
        max_bad_fraction=max_bad_fraction,
        template=template,
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
    return data.encode(preserve_order=preserve_order), ledger
