"""Records of the real file formats that the toy world is written in.

- Training: LLaVA instruction JSON, a list of ``{"id", "image", "conversations": [human, gpt, ...]}`` with the
  image path relative to an image folder (as ``llava_v1_5_mix665k.json``); one multi-turn conversation per
  scene, as LLaVA-1.5's VQA data groups the questions of an image.
- Test: a LLaVA evaluation question file (jsonl ``question_id``, ``image``, ``text``, ``category``) and a
  ground-truth file (jsonl ``question_id``, ``answer``, ``category``).
- Yes/no questions also as POPE: a question file whose ``category`` is the negative-sampling split, and one
  label file per split, ``coco_pope_<split>.json`` (one ``{"question_id", "image", "text", "label"}`` per
  line), the names LLaVA's ``eval_pope.py`` looks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pipelines.toy.scenes import Question

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt


def conversation_record(sample_id: str, image: str, questions: list[Question]) -> dict:
    """One LLaVA instruction sample: a human/gpt turn per question, ``<image>`` in the first human turn, the
    one-word answers capitalised as in LLaVA's data."""
    turns = []
    for i, question in enumerate(questions):
        image_tag = "<image>\n" if i == 0 else ""
        turns.append({"from": "human", "value": f"{image_tag}{question.text}{PROMPT_SUFFIX}"})
        turns.append({"from": "gpt", "value": question.answer.capitalize()})
    return {"id": sample_id, "image": image, "conversations": turns}


def question_record(question_id: int, image: str, question: Question, category: str | None = None) -> dict:
    """One line of a LLaVA evaluation question file (``category`` defaults to the question type)."""
    return {
        "question_id": question_id,
        "image": image,
        "text": f"{question.text}{PROMPT_SUFFIX}",
        "category": category or question.category,
    }


def answer_record(question_id: int, question: Question) -> dict:
    """One line of the ground-truth file (lower-case answers, as the VQA scorers normalise them)."""
    return {"question_id": question_id, "answer": question.answer, "category": question.category}


def pope_label_record(question_id: int, image: str, question: Question) -> dict:
    """One line of a POPE label file."""
    if question.category != "exist":
        raise ValueError(f"POPE labels are for yes/no questions, got a {question.category!r} question")
    return {"question_id": question_id, "image": image, "text": question.text, "label": question.answer}


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
