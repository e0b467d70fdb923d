"""POPE: LLaVA's yes/no parser, metrics by hand, and LLaVA-1.5-13B's published mean F1 from its answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.pope import binary_metrics, parse_yes_no

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llava-v1.5-13b"


def pope_fixture() -> Path:
    folder = FIXTURES / "pope"
    if not (folder / "answers.jsonl").is_file():
        pytest.skip(f"LLaVA-1.5-13B POPE fixtures not found at {folder.resolve()}")
    return folder


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes, there is a dog. No other animals.", "yes"),  # only the first sentence counts
        ("No,", "no"),  # commas are deleted before splitting
        ("NO", "yes"),  # only "No", "no" and "not" are negative
        ("Nope", "yes"),
        ("I don't know", "yes"),
        ("", "yes"),
    ],
)
def test_parse_yes_no(text: str, expected: str) -> None:
    assert parse_yes_no(text) == expected


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["yes_ratio"] == pytest.approx(60.0)
    assert binary_metrics(["no"], ["yes"])["f1"] == 0.0  # no positive prediction: 0, not a ZeroDivisionError


def test_llava_v15_13b_published_pope_f1() -> None:
    folder = pope_fixture()
    res = score("pope", folder / "llava_pope_test.jsonl", folder / "answers.jsonl", folder)
    assert round(res["score"], 1) == 85.9  # published for LLaVA-1.5-13B
    assert res["metric"].startswith("f1")
    assert [k for k in res["breakdown"] if k != "f1_mean"] == ["random", "popular", "adversarial"]
    sizes = {s: sum(res["breakdown"][s][k] for k in ("tp", "fp", "tn", "fn")) for s in ("random", "popular")}
    assert sizes == {"random": 2910, "popular": 3000}
    assert res["counts"]["missing"] == 0 and res["warnings"] == []


def _mini_pope(tmp_path: Path, labels: list[str], answers: list[str]) -> tuple[list, list, Path]:
    questions = [
        {
            "question_id": i,
            "image": "a.jpg",
            "text": f"Is there a {i}?\nAnswer the question using a single word or phrase.",
            "category": "random",
        }
        for i in range(len(labels))
    ]
    lines = [
        json.dumps({"question_id": i, "image": "a.jpg", "text": f"Is there a {i}?", "label": lab})
        for i, lab in enumerate(labels)
    ]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return questions, [{"question_id": i, "text": t} for i, t in enumerate(answers)], tmp_path


def test_pairs_by_order_and_reports_mismatched_pairs(tmp_path: Path) -> None:
    questions, answers, folder = _mini_pope(tmp_path, ["yes", "no", "yes", "no"], ["Yes", "No", "No", "Yes"])
    res = score("pope", questions, answers, folder)
    assert res["breakdown"]["random"]["accuracy"] == 50.0
    assert res["score"] == pytest.approx(50.0)
    # Answers in another order are still paired by position, as LLaVA does, but the mismatch is reported.
    res = score("pope", questions, answers[::-1], folder)
    assert res["breakdown"]["random"]["accuracy"] == 50.0
    assert any("ask a different question" in w for w in res["warnings"])


def test_pope_errors(tmp_path: Path) -> None:
    questions, answers, folder = _mini_pope(tmp_path, ["yes", "no"], ["Yes", "No"])
    with pytest.raises(ScoringError, match="pairs answers with labels by order"):
        score("pope", questions, answers[:1], folder)
    with pytest.raises(ScoringError, match="folder not found"):
        score("pope", questions, answers, tmp_path / "nope")
    (tmp_path / "coco_pope_random.json").write_text('{"label": "yes"}\n{broken\n')
    with pytest.raises(ScoringError, match=r"coco_pope_random.json:2"):
        score("pope", questions, answers, folder)
