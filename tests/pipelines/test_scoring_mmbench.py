"""MMBench: option extraction and circular evaluation over shifted copies and LLaVA's --all-rounds answers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.mmbench import extract_option

CHOICES = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("The answer is C.", "C"),
        ("(D) fish", "D"),
        ("A cat is shown", "A"),  # the article read as the letter A: the original evaluator's quirk
        ("It is a cat", "B"),  # no letter: option content
        ("a dog chasing a cat", None),  # two contents match
        ("A or B", None),  # two letters
        ("Cannot determine the answer", "Z"),
        ("Z", "Z"),
        ("something else", None),
    ],
)
def test_extract_option(text: str, expected: str | None) -> None:
    assert extract_option(text, CHOICES) == expected


def _tsv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({"hint": "nan", "image": "aGVsbG8=", "C": "", "D": "", **row})
    return path


def _rotations(index: int, options: list[str], answer: str, category: str, question: str) -> list[dict]:
    letters = "ABCD"[: len(options)]
    rows = []
    for k in range(len(options)):
        shown = options[k:] + options[:k]
        row = {
            "index": index + k * 1_000_000,
            "question": question,
            "category": category,
            "l2-category": "perception",
        }
        row |= dict(zip(letters, shown, strict=True))
        row["answer"] = letters[shown.index(options[letters.index(answer)])]
        rows.append(row)
    return rows


def test_circular_evaluation_over_shifted_copies(tmp_path: Path) -> None:
    rows = _rotations(0, ["dog", "cat", "bird", "fish"], "B", "animal", "What animal?")
    rows += _rotations(1, ["red", "green"], "A", "color", "What color?")
    assert [r["answer"] for r in rows] == ["B", "A", "D", "C", "A", "B"]
    tsv = _tsv(tmp_path / "mmbench_dev.tsv", rows)
    answers = [
        {"question_id": 0, "text": "B"},
        {"question_id": 1_000_000, "text": "A"},
        {"question_id": 2_000_000, "text": "The answer is D."},
        {"question_id": 3_000_000, "text": "cat"},  # content match: C in this rotation
        {"question_id": 1, "text": "A"},
        {"question_id": 1_000_001, "text": "A"},  # wrong in the rotated copy
    ]
    for name in ("mmbench", "MMBench-CN"):
        res = score(name, tsv, answers)
        assert res["score"] == 50.0
        assert res["breakdown"]["vanilla"] == 100.0
        assert res["breakdown"]["category"] == {"animal": 100.0, "color": 0.0}
        assert res["breakdown"]["l2-category"] == {"perception": 50.0}
        assert res["counts"]["questions_circular"] == 2
    res = score("mmbench", tsv, answers[:3] + answers[4:5])  # two copies unanswered
    assert res["score"] == 0.0 and res["counts"]["missing"] == 2


def test_llava_all_rounds_answers(tmp_path: Path) -> None:
    tsv = _tsv(
        tmp_path / "m.tsv",
        [
            {
                "index": 5,
                "question": "Q?",
                "A": "x",
                "B": "y",
                "C": "z",
                "answer": "C",
                "category": "c",
                "l2-category": "l2",
            }
        ],
    )

    def rnd(r: int, text: str) -> dict:
        options, chars = ["x", "y", "z"], ["A", "B", "C"]
        return {
            "question_id": 5,
            "round_id": r,
            "text": text,
            "options": options[r:] + options[:r],
            "option_char": chars[r:] + chars[:r],
        }

    # Round 1 shows [y, z, x]: the right option z is B; round 2 shows [z, x, y]: z is A.
    assert score("mmbench", tsv, [rnd(0, "C"), rnd(1, "B"), rnd(2, "z")])["score"] == 100.0
    assert score("mmbench", tsv, [rnd(0, "C"), rnd(1, "C"), rnd(2, "A")])["score"] == 0.0
    assert score("mmbench", tsv, [rnd(0, "C"), rnd(1, "B")])["score"] == 0.0  # a round is missing
    with pytest.raises(ScoringError, match="second answer for index 5 round 1"):
        score("mmbench", tsv, [rnd(0, "C"), rnd(1, "B"), rnd(1, "B")])


def test_mmbench_errors(tmp_path: Path) -> None:
    tsv = _tsv(tmp_path / "test.tsv", [{"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": ""}])
    with pytest.raises(ScoringError, match="row 1 .*has no answer"):
        score("mmbench", tsv, [])
    good = _tsv(tmp_path / "dev.tsv", [{"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": "A"}])
    with pytest.raises(ScoringError, match="question_id 9, which is not in"):
        score("mmbench", good, [{"question_id": 9, "text": "A"}])
