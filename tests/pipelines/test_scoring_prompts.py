"""Prompt suffixes: LLaVA's question files already carrying them, and the ones LLaVA appends at inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval.datasets import (
    BENCHMARKS,
    OPTION_LETTER,
    OPTION_LETTER_CN,
    SHORT_ANSWER,
    VIZWIZ_SUFFIX,
    build_prompt,
    canonical_name,
)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "llava-v1.5-13b"


def test_names_and_aliases() -> None:
    assert len(BENCHMARKS) == 10
    assert canonical_name("MMBench-CN") == "mmbench_cn"
    assert canonical_name("LLaVA-Bench-in-the-Wild") == "llava_bench"
    assert canonical_name("MM-Vet") == "mmvet"
    assert canonical_name("ScienceQA-IMG") == "scienceqa"
    with pytest.raises(ValueError, match="unknown benchmark"):
        canonical_name("mmmu")


def test_suffix_is_appended_once() -> None:
    bare = {"text": "What color is the bus?"}
    once = build_prompt("vqav2", bare)
    assert once == f"What color is the bus?\n{SHORT_ANSWER}"
    assert build_prompt("vqav2", {"text": once}) == once
    assert build_prompt("gqa", {"text": once + "\n"}) == once
    full = f"Is it blue?\n{VIZWIZ_SUFFIX}"
    assert build_prompt("vizwiz", {"text": "Is it blue?"}) == full
    assert build_prompt("vizwiz", {"text": full}) == full
    assert build_prompt("vizwiz", {"text": f"Is it blue?\n{SHORT_ANSWER}"}) == full  # partial suffix completed
    assert build_prompt("mmvet", {"text": "Explain the joke."}) == "Explain the joke."
    assert build_prompt("llava_bench", {"text": "Describe."}) == "Describe."


def test_textvqa_ocr_line_kept() -> None:
    text = f"what is written?\nReference OCR token: STOP\n{SHORT_ANSWER}"
    assert build_prompt("textvqa", {"text": text}) == text


def test_mmbench_rows_en_and_cn() -> None:
    row = {
        "question": "Which animal?",
        "hint": "Look closely.",
        "A": "dog",
        "B": "cat",
        "C": "nan",
        "D": "nan",
    }
    assert build_prompt("mmbench", row) == f"Look closely.\nWhich animal?\nA. dog\nB. cat\n{OPTION_LETTER}"
    row["hint"] = float("nan")
    assert build_prompt("mmbench_cn", row) == f"Which animal?\nA. dog\nB. cat\n{OPTION_LETTER_CN}"


def test_pope_prompts_match_llava_answers() -> None:
    folder = FIXTURES / "pope"
    if not (folder / "answers.jsonl").is_file():
        pytest.skip(f"LLaVA-1.5-13B POPE fixtures not found at {folder.resolve()}")
    questions = {q["question_id"]: q for q in map(json.loads, (folder / "llava_pope_test.jsonl").open())}
    for a in map(json.loads, (folder / "answers.jsonl").open()):
        assert build_prompt("pope", questions[a["question_id"]]) == a["prompt"]


def test_scienceqa_prompts_match_llava_answers() -> None:
    folder = FIXTURES / "scienceqa"
    if not (folder / "answers.jsonl").is_file():
        pytest.skip(f"LLaVA-1.5-13B ScienceQA fixtures not found at {folder.resolve()}")
    problems = {p["id"]: p for p in json.loads((folder / "llava_test_CQM-A.json").read_text())}
    for a in map(json.loads, (folder / "answers.jsonl").open()):
        # LLaVA records "<image>\n" before IMG problems' prompts; the image token is not prompt text.
        assert build_prompt("scienceqa", problems[a["question_id"]]) == a["prompt"].removeprefix("<image>\n")
