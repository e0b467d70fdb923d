"""Toy-world accuracy: exact match against the ground-truth jsonl (``question_id``, ``answer``, ``category``).

Prediction and answer are normalized as GQA's prediction (stripped, trailing periods removed, lower-cased), so
"Red." matches "red". Accuracy is reported over all questions and per question type (the ground truth's
``category``, else the question's). GQA's own scorer does not fit: it reads GQA's questions JSON and splits only
binary / open.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipelines.eval.scoring.common import (
    ScoringError,
    Source,
    base_counts,
    index_questions,
    pct,
    read_answered,
    read_jsonl,
    result,
)
from pipelines.eval.scoring.gqa import normalize_prediction
from pipelines.eval.scoring.intervals import mean_replicates

TOY_BENCHMARK = "toy"


def score_toy(questions: Source, answers: Source, annotations: str | None) -> dict[str, Any]:
    """Exact-match accuracy (percent) overall and per category; breakdown ``{"accuracy", "category": {...}}``."""
    if annotations is None:
        raise ScoringError("toy needs --annotations: the toy world's ground_truth.jsonl")
    truth = index_questions(str(annotations), read_jsonl(annotations, "toy ground truth"))
    qname, qs, answer_file, by_id = read_answered(questions, answers)

    hits: list[bool] = []
    per_category: dict[str, list[bool]] = defaultdict(list)
    for qid, (line, question) in qs.items():
        if qid not in truth or "answer" not in truth[qid][1]:
            raise ScoringError(f"{qname}:{line}: question {qid} has no answer in {annotations}")
        gt = truth[qid][1]
        ans = by_id.get(qid)
        hit = ans is not None and normalize_prediction(ans.text) == normalize_prediction(str(gt["answer"]))
        hits.append(hit)
        per_category[str(gt.get("category", question.get("category", "none")))].append(hit)
    accuracy = pct(sum(hits), len(hits))
    breakdown = {"accuracy": accuracy, "category": {c: pct(sum(v), len(v)) for c, v in sorted(per_category.items())}}
    counts = base_counts(len(qs), len(by_id), answer_file)
    replicates = mean_replicates(hits, TOY_BENCHMARK)
    return result(TOY_BENCHMARK, "accuracy", accuracy, breakdown, counts, answer_file.malformed, replicates)
