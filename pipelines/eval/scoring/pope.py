"""POPE, following LLaVA's ``llava/eval/eval_pope.py``.

- An answer is "no" when, after keeping only the text before its first "." and deleting commas, one of the
  space-separated words is exactly "No", "no" or "not"; anything else (including an empty answer) is "yes".
- Labels come from ``coco_pope_<split>.json`` (one JSON object per line, ``label`` yes/no) in the annotations
  folder, and are paired with the answers of that split BY ORDER: the k-th answer (in answer-file order) whose
  question has ``category == split`` is scored against the k-th label line. Here a count mismatch is an error
  (LLaVA's ``zip`` would silently truncate), and pairs whose label text/image disagree with the question are
  counted as a warning.
- Per split: accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class. The headline is
  the mean F1 over the splits, the number the LLaVA-1.5 paper reports. Where LLaVA divides by zero, 0 is
  reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.eval.datasets import POPE
from pipelines.eval.scoring.common import (
    ScoringError,
    Source,
    base_counts,
    check_known,
    index_questions,
    load_answers,
    pct,
    question_records,
    read_jsonl,
    result,
)
from pipelines.eval.scoring.intervals import bootstrap, mean_replicates

SPLITS = ("random", "popular", "adversarial")


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE answer parser: "yes" or "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (percent; "yes" positive) and the confusion counts."""
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and lab != "yes" for p, lab in zip(preds, labels, strict=True))
    tn = sum(p == "no" and lab != "yes" for p, lab in zip(preds, labels, strict=True))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels, strict=True))
    precision, recall = pct(tp, tp + fp), pct(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": f1,
        "accuracy": pct(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "yes_ratio": pct(preds.count("yes"), len(preds)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def f1_replicates(preds: list[str], labels: list[str], seed: str) -> np.ndarray:
    """Bootstrap replicates (R,) of :func:`binary_metrics`' F1 (percent) over the questions of one split."""
    positive = np.array([p == "yes" for p in preds], dtype=np.float64)  # (n,)
    truth = np.array([lab == "yes" for lab in labels], dtype=np.float64)  # (n,)

    def f1(counts: np.ndarray) -> np.ndarray:  # (r, n) -> (r,): 2 tp / (2 tp + fp + fn), as precision and recall give
        tp, fp, fn = counts @ (positive * truth), counts @ (positive * (1 - truth)), counts @ ((1 - positive) * truth)
        return np.divide(200 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=tp > 0)

    return bootstrap(len(labels), f1, seed)


def _question_text(text: str) -> str:
    return text.split("\n")[0].strip()


def score_pope(questions: Source, answers: Source, annotations: str | None) -> dict[str, Any]:
    """POPE metrics per split and mean F1; ``annotations``: the folder with ``coco_pope_<split>.json``."""
    if annotations is None:
        raise ScoringError("pope needs --annotations: the folder with coco_pope_{random,popular,adversarial}.json")
    folder = Path(annotations)
    if not folder.is_dir():
        raise ScoringError(f"POPE annotations folder not found: {folder}")
    qname, records = question_records(questions)
    qs = index_questions(qname, records)
    answer_file = load_answers(answers)
    check_known(answer_file, qs, qname)

    present = {str(q.get("category")) for _, q in qs.values()}
    splits = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
    breakdown: dict[str, Any] = {}
    warnings = list(answer_file.malformed)
    n_answered, replicates = 0, []
    for split in splits:
        label_file = folder / f"coco_pope_{split}.json"
        labels = read_jsonl(label_file, "POPE label")
        cur = [a for a in answer_file.answers if qs[a.qid][1].get("category") == split]
        if len(cur) != len(labels):
            raise ScoringError(
                f"{answer_file.source}: {len(cur)} answers for POPE split {split!r} but {label_file} has "
                f"{len(labels)} labels; POPE pairs answers with labels by order, "
                "so every question needs one answer"
            )
        mismatched = 0
        for a, (_, lab) in zip(cur, labels, strict=True):
            q = qs[a.qid][1]
            if "text" in lab and _question_text(str(q.get("text", ""))) != str(lab["text"]).strip():
                mismatched += 1
            elif "image" in lab and "image" in q and q["image"] != lab["image"]:
                mismatched += 1
        if mismatched:
            warnings.append(
                f"{split}: {mismatched} answer/label pairs (paired by order) ask a different question than the label"
            )
        for n, lab in labels:
            if lab.get("label") not in ("yes", "no"):
                raise ScoringError(f"{label_file}:{n}: 'label' must be 'yes' or 'no'")
        preds, truth = [parse_yes_no(a.text) for a in cur], [lab["label"] for _, lab in labels]
        breakdown[split] = binary_metrics(preds, truth)
        replicates.append(f1_replicates(preds, truth, f"{POPE}/{split}"))  # each split resampled within itself
        n_answered += len({a.qid for a in cur})
    f1 = sum(breakdown[s]["f1"] for s in splits) / len(splits) if splits else 0.0
    breakdown = {"f1_mean": f1, **breakdown}
    counts = base_counts(len(qs), n_answered, answer_file)
    replicates = np.mean(replicates, axis=0) if replicates else mean_replicates([], POPE)
    return result(POPE, "f1 (mean over splits)", f1, breakdown, counts, warnings, replicates)
