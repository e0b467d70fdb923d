"""GQA: LLaVA's light normalization and exact match over the balanced questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.gqa import normalize_prediction


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), (" Table ", "table"), ("etc..", "etc"), ("3.5", "3.5"), ("Left side", "left side")],
)
def test_normalize_prediction(text: str, expected: str) -> None:
    assert normalize_prediction(text) == expected


def test_gqa_exact_match_balanced_binary_open(tmp_path: Path) -> None:
    truth = {
        "201": {"answer": "yes", "types": {"structural": "verify"}, "isBalanced": True},
        "202": {"answer": "table", "types": {"structural": "query"}, "isBalanced": True},
        "203": {"answer": "left", "types": {"structural": "query"}, "isBalanced": True},
        "204": {"answer": "no", "types": {"structural": "logical"}, "isBalanced": False},
    }
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps(truth))
    questions = [{"question_id": q, "text": "?", "image": "n1.jpg"} for q in truth]
    answers = [
        {"question_id": "201", "text": "Yes."},
        {"question_id": "202", "text": "Table"},
        {"question_id": "203", "text": "the left"},  # no article removal in GQA: wrong
        {"question_id": "204", "text": "yes"},  # not balanced: not scored
    ]
    res = score("gqa", questions, answers, annotations)
    assert res["score"] == pytest.approx(200 / 3)
    assert res["breakdown"]["binary"] == 100.0
    assert res["breakdown"]["open"] == 50.0
    assert res["counts"]["scored"] == 3


def test_gqa_errors(tmp_path: Path) -> None:
    annotations = tmp_path / "q.json"
    annotations.write_text(json.dumps({"1": {"answer": "yes"}}))
    with pytest.raises(ScoringError, match="no answer in"):
        score("gqa", [{"question_id": "2", "text": "?"}], [], annotations)
    with pytest.raises(ScoringError, match="needs --annotations"):
        score("gqa", [{"question_id": "1", "text": "?"}], [])
