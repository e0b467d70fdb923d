"""GQA accuracy as LLaVA-1.5 computes it: ``scripts/convert_gqa_for_eval.py``, then GQA's ``eval.py``.

The prediction is stripped, trailing periods removed and lower-cased (LLaVA: ``text.rstrip('.').lower()`` on
an already stripped answer); it is right when it equals the ``answer`` of the question in GQA's questions JSON
(``{qid: {"answer": ..., "types": {"structural": ...}, "isBalanced": ...}}``, e.g.
``testdev_balanced_questions.json``). As in ``eval.py``, only questions with ``isBalanced`` true count (all of
them when the field is absent), and when the question types are present, accuracy is also split into
``binary`` and ``open`` (structural type "query"). GQA's other metrics (consistency, validity, plausibility,
grounding, distribution) are not computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.eval.datasets import GQA
from pipelines.eval.scoring.common import (
    ScoringError,
    Source,
    base_counts,
    pct,
    read_answered,
    read_json,
    result,
)
from pipelines.eval.scoring.intervals import mean_replicates


def normalize_prediction(text: str) -> str:
    """LLaVA's light normalization of a GQA answer."""
    return text.strip().rstrip(".").lower()


def score_gqa(questions: Source, answers: Source, annotations: str | None) -> dict[str, Any]:
    """Exact-match accuracy over the balanced questions of the questions file."""
    if annotations is None:
        raise ScoringError("gqa needs --annotations: GQA's questions JSON (e.g. testdev_balanced_questions.json)")
    truth = read_json(annotations, "GQA questions")
    if not isinstance(truth, Mapping):
        raise ScoringError(f"{annotations}: expected GQA's questions JSON ({{question_id: {{'answer': ...}}}})")
    qname, qs, answer_file, by_id = read_answered(questions, answers)

    scores: dict[str, list[bool]] = {"accuracy": [], "binary": [], "open": []}
    for qid, (line, _) in qs.items():
        gt = truth.get(qid)
        if not isinstance(gt, Mapping) or "answer" not in gt:
            raise ScoringError(f"{qname}:{line}: question {qid} has no answer in {annotations}")
        if not gt.get("isBalanced", True):
            continue
        ans = by_id.get(qid)
        hit = ans is not None and normalize_prediction(ans.text) == gt["answer"]
        scores["accuracy"].append(hit)
        structural = (gt.get("types") or {}).get("structural")
        if structural is not None:
            scores["open" if structural == "query" else "binary"].append(hit)
    breakdown = {k: pct(sum(v), len(v)) for k, v in scores.items() if v}
    breakdown.setdefault("accuracy", 0.0)
    counts = base_counts(len(qs), len(by_id), answer_file) | {"scored": len(scores["accuracy"])}
    replicates = mean_replicates(scores["accuracy"], GQA)
    return result(GQA, "accuracy", breakdown["accuracy"], breakdown, counts, answer_file.malformed, replicates)
