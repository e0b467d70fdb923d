"""ScienceQA: LLaVA's letter extraction, and LLaVA-1.5-13B's published IMG accuracy from its answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.scienceqa import FAILED, parse_letter

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llava-v1.5-13b"


def scienceqa_fixture() -> Path:
    folder = FIXTURES / "scienceqa"
    if not (folder / "answers.jsonl").is_file():
        pytest.skip(f"LLaVA-1.5-13B ScienceQA fixtures not found at {folder.resolve()}")
    return folder


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),
        ("E", "E"),
        ("B. apostrophe", "B"),
        ("The answer is C.", "C"),
        ("Because of X. The answer is D!", "D"),  # the pattern's final "." matches any character
        ("The answer is C", FAILED),  # ... but needs one
        ("The answer is A. The answer is B.", FAILED),  # more than one match
        ("B.", FAILED),  # shorter than "X. "
        ("F", FAILED),
        ("a", FAILED),
        ("", FAILED),
    ],
)
def test_parse_letter(text: str, expected: str) -> None:
    assert parse_letter(text) == expected


def test_llava_v15_13b_published_scienceqa_img() -> None:
    folder = scienceqa_fixture()
    res = score("scienceqa", folder / "llava_test_CQM-A.json", folder / "answers.jsonl")
    assert round(res["score"], 1) == 71.6  # published for LLaVA-1.5-13B
    assert res["breakdown"]["img_questions"] == 2017
    assert res["counts"]["questions"] == 4241 and res["counts"]["missing"] == 0


def _problem(pid: str, letter: str, image: bool) -> dict:
    rec = {
        "id": pid,
        "conversations": [{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": letter}],
    }
    if image:
        rec["image"] = f"{pid}/image.png"
    return rec


def test_img_subset_missing_and_unparsed() -> None:
    problems = [
        _problem("1", "A", True),
        _problem("2", "B", True),
        _problem("3", "B", False),
        _problem("4", "A", False),
    ]
    answers = [
        {"question_id": "1", "text": "A"},
        {"question_id": "3", "text": "B"},
        {"question_id": "4", "text": "?"},
    ]
    res = score("sqa", problems, answers)
    assert res["breakdown"]["img_accuracy"] == 50.0  # "2" has no answer: wrong
    assert res["breakdown"]["accuracy"] == 50.0
    assert res["breakdown"]["no_img_accuracy"] == 50.0
    assert res["counts"]["missing"] == 1 and res["counts"]["unparsed"] == 1


def test_scienceqa_errors() -> None:
    with pytest.raises(ScoringError, match="takes no annotations"):
        score("scienceqa", [_problem("1", "A", True)], [], annotations="x.json")
    with pytest.raises(ScoringError, match="not a letter"):
        score("scienceqa", [_problem("1", "yes", True)], [])
