"""VQA accuracy: the official normalization's hard corners and hand-computed leave-one-out accuracies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval.datasets import SHORT_ANSWER
from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.vqa import evalai_answer, normalize_answer, textvqa_question, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2,000", "2000"),  # comma between digits: all punctuation deleted
        ("1,000-2,000", "10002000"),  # ... including the dash
        ("ten", "10"),
        ("Ten", "10"),
        ("none", "0"),
        ("  two   dogs ", "2 dogs"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("e.g.", "eg"),
        ("t-shirt", "t shirt"),  # punctuation touching no space becomes a space
        ("red, white", "red white"),  # ... and is deleted when it touches one
        ("black and white!", "black and white"),
        ("dog's", "dog's"),
        ("left/right", "left right"),
    ],
)
def test_normalize_answer_official(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("2,000", "2000"),
        ("What?", "what"),
        ("Dog's bowl", "dog 's bowl"),  # m4c splits possessives, the official normalization does not
        ("Two\tcats", "2 cats"),
        ("Unanswerable", "unanswerable"),
        ("t-shirt", "t shirt"),
    ],
)
def test_evalai_answer(raw: str, expected: str) -> None:
    assert evalai_answer(raw) == expected


def test_leave_one_out_accuracy_hand_computed() -> None:
    gts = ["red"] * 3 + ["blue"] * 7
    # Leaving out a "red": 2 matches left -> 2/3; leaving out a "blue": 3 -> 1.  (3 * 2/3 + 7) / 10
    assert vqa_accuracy("red", gts) == pytest.approx(0.9)
    assert vqa_accuracy("blue", gts) == pytest.approx(1.0)
    assert vqa_accuracy("green", gts) == 0.0
    # Two matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; one match: 9 * 1/3 / 10 = 0.3.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)


def test_fewer_than_ten_answers_use_the_same_rule() -> None:
    # 4 answers (as some VizWiz-style records): (1/3 + 1/3 + 2/3 + 2/3) / 4 = 0.5
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no"]) == pytest.approx(0.5)
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # nothing left to agree with
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_official_normalizes_only_when_humans_disagree() -> None:
    # Unanimous humans: compared raw (only whitespace cleaned).
    assert vqa_accuracy("2000", ["2,000"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # Disagreeing humans: both sides normalized.
    assert vqa_accuracy("2000", ["2,000"] * 5 + ["2000"] * 5) == 1.0
    assert vqa_accuracy("A dog.", ["dog"] * 5 + ["a dog"] * 5) == 1.0
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0


def test_m4c_variant_differs_where_documented() -> None:
    assert vqa_accuracy("2000", ["2,000"] * 10, variant="m4c") == 1.0
    # LLaVA's VQAv2 pipeline: EvalAI processing of the prediction, then the official rule.
    gts = ["dog's"] * 6 + ["cat"] * 4
    assert vqa_accuracy(evalai_answer("dog's"), gts) == 0.0
    assert vqa_accuracy("dog's", gts, variant="m4c") == 1.0


def test_textvqa_question_from_llava_prompt() -> None:
    prompt = f"What is the brand?\nReference OCR token: DAKOTA, DIGITAL\n{SHORT_ANSWER}"
    assert textvqa_question(prompt) == "What is the brand?"
    assert textvqa_question("OCR tokens: a b Question: what is it? Short answer:") == "what is it?"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_vqav2_scorer_end_to_end(tmp_path: Path) -> None:
    suffix = "\nAnswer the question using a single word or phrase."
    questions = _jsonl(
        tmp_path / "q.jsonl",
        [{"question_id": i, "image": f"{i}.jpg", "text": f"q{i}?{suffix}", "category": "default"} for i in (1, 2, 3)],
    )

    def ann(qid: int, answers: list[str], kind: str) -> dict:
        items = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]
        return {
            "question_id": qid,
            "answers": items,
            "answer_type": kind,
            "multiple_choice_answer": answers[0],
        }

    annotations = tmp_path / "ann.json"
    annotations.write_text(
        json.dumps(
            {
                "annotations": [
                    ann(1, ["yes"] * 10, "yes/no"),
                    ann(2, ["2"] * 3 + ["3"] * 7, "number"),
                    ann(3, ["red"] * 10, "other"),
                ]
            }
        )
    )
    answers = _jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "question_id": 1,
                "prompt": "",
                "text": "Yes",
                "answer_id": "x",
                "model_id": "m",
                "metadata": {},
            },
            {
                "question_id": 2,
                "prompt": "",
                "text": "Two",
                "answer_id": "y",
                "model_id": "m",
                "metadata": {},
            },
            "{not json",
        ],
    )
    res = score("VQAv2", questions, answers, annotations)
    # q1: "Yes" -> "yes" = 1.0; q2: "two" -> "2", 3 of 10 -> 0.9; q3 missing -> 0.
    assert res["score"] == pytest.approx(100 * 1.9 / 3)
    assert res["breakdown"]["per_answer_type"] == {
        "number": pytest.approx(90.0),
        "other": 0.0,
        "yes/no": 100.0,
    }
    assert res["counts"] == {"questions": 3, "answered": 2, "missing": 1, "malformed_lines": 1}
    assert res["warnings"][0].startswith(f"{answers}:3: malformed answer line")


def test_vizwiz_scorer_joins_by_image(tmp_path: Path) -> None:
    questions = [
        {"question_id": 0, "image": "VizWiz_val_0.jpg", "text": "What is this?"},
        {"question_id": 1, "image": "VizWiz_val_1.jpg", "text": "What color?"},
    ]
    conf = "yes"
    annotations = tmp_path / "val.json"
    annotations.write_text(
        json.dumps(
            [
                {
                    "image": "VizWiz_val_1.jpg",
                    "question": "What color?",
                    "answers": [{"answer": a, "answer_confidence": conf} for a in ["blue"] * 2 + ["navy"] * 8],
                    "answer_type": "other",
                    "answerable": 1,
                },
                {
                    "image": "VizWiz_val_0.jpg",
                    "question": "What is this?",
                    "answers": [{"answer": "unanswerable", "answer_confidence": conf}] * 10,
                    "answer_type": "unanswerable",
                    "answerable": 0,
                },
            ]
        )
    )
    answers = [{"question_id": 0, "text": "Unanswerable"}, {"question_id": 1, "text": "Blue."}]
    res = score("vizwiz", questions, answers, annotations)
    assert res["score"] == pytest.approx((100 + 60) / 2)


def test_textvqa_scorer_with_llava_ids(tmp_path: Path) -> None:
    text = "what is written?\nReference OCR token: STOP\nAnswer the question using a single word or phrase."
    questions = [{"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": text}]
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    gts = ["stop"] * 9 + ["stop sign"]
    annotations.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "question_id": 34602,
                        "image_id": "003a8ae2ef43b901",
                        "question": "What is written?",
                        "answers": gts,
                    }
                ]
            }
        )
    )
    res = score("textvqa", questions, [{"question_id": "003a8ae2ef43b901", "text": "STOP"}], annotations)
    assert res["score"] == pytest.approx(100.0)
    by_id = score("textvqa", [{"question_id": 34602, "text": text}], [{"question_id": 34602, "text": "x"}], annotations)
    assert by_id["score"] == 0.0


def test_vqa_scorer_errors(tmp_path: Path) -> None:
    questions = [{"question_id": 7, "text": "q"}]
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ScoringError, match="no ground truth"):
        score("vqav2", questions, [], annotations)
    with pytest.raises(ScoringError, match="needs --annotations"):
        score("vqav2", questions, [])
    with pytest.raises(ScoringError, match="not in"):
        score("vqav2", questions, [{"question_id": 8, "text": "x"}], annotations)
    with pytest.raises(ScoringError, match="file not found"):
        score("vqav2", questions, [], tmp_path / "missing.json")
    annotations.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer_id": 1}]}]}))
    with pytest.raises(ScoringError, match=r"annotations\[0\]: an answer record has no 'answer'"):
        score("vqav2", questions, [], annotations)
    annotations.write_text('{"annotations": [\n  {"question_id": 7,,}]}')
    with pytest.raises(ScoringError, match=r"ann.json:2:\d+: VQAv2 annotations file is not valid JSON"):
        score("vqav2", questions, [], annotations)
