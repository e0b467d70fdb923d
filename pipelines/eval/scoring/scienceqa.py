"""ScienceQA, following LLaVA's ``llava/eval/eval_science_qa.py``.

The letter is read from the answer text in this order: the text is exactly one of A-E; or it is at least three
characters, starts with one of A-E and continues with ". " ("B. apostrophe"); or the pattern
``The answer is ([A-Z]).`` (the final "." matches any character) occurs exactly once. Otherwise the answer is
"FAILED", as is a missing answer; both count as wrong. A problem is right when the letter is the ground truth.

The questions file is LLaVA's ``llava_test_CQM-A.json``: the ``gpt`` turn holds the answer letter and problems
with an ``image`` key form the IMG subset (LLaVA tests ``<image>`` in the answer's prompt, which marks the
same problems). The headline is IMG accuracy, the number the LLaVA-1.5 paper reports; overall accuracy is also
given.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pipelines.eval.datasets import SCIENCEQA
from pipelines.eval.scoring.common import (
    ScoringError,
    Source,
    answers_by_id,
    base_counts,
    index_questions,
    load_answers,
    no_annotations,
    pct,
    read_json,
    result,
    source_name,
)
from pipelines.eval.scoring.intervals import mean_replicates

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str:
    """The option letter LLaVA's ScienceQA scorer reads from an answer, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _ground_truth(name: str, where: int | str, problem: Any) -> str:
    try:
        turns = problem["conversations"]
        letter = next(t["value"] for t in turns if t.get("from") == "gpt").strip()
    except (KeyError, TypeError, StopIteration):
        raise ScoringError(f"{name}:{where}: problem has no 'gpt' turn with the answer letter") from None
    if letter not in OPTIONS:
        raise ScoringError(f"{name}:{where}: answer {letter!r} is not a letter A-E")
    return letter


def score_scienceqa(questions: Source, answers: Source, annotations: str | None = None) -> dict[str, Any]:
    """IMG and overall accuracy; ``questions`` is ``llava_test_CQM-A.json`` (path or its list of problems)."""
    no_annotations(SCIENCEQA, annotations)
    name = source_name(questions)
    problems = read_json(questions, "ScienceQA questions") if isinstance(questions, str | os.PathLike) else questions
    if not isinstance(problems, list):
        raise ScoringError(f"{name}: expected LLaVA's ScienceQA JSON (a list of conversation records)")
    qs = index_questions(name, ((f"[{i}]", p) for i, p in enumerate(problems)), id_key="id")
    answer_file = load_answers(answers)
    by_id = answers_by_id(answer_file, qs, name)

    img_hits = []  # the headline's questions (those with an image)
    correct = {"all": 0, "img": 0, "no_img": 0}
    total = {"all": 0, "img": 0, "no_img": 0}
    failed = 0
    for qid, (where, problem) in qs.items():
        ans = by_id.get(qid)
        letter = parse_letter(ans.text) if ans is not None else FAILED
        failed += ans is not None and letter == FAILED
        hit = letter == _ground_truth(name, where, problem)
        subset = "img" if "image" in problem else "no_img"
        if subset == "img":
            img_hits.append(hit)
        for key in ("all", subset):
            total[key] += 1
            correct[key] += hit
    breakdown = {
        "img_accuracy": pct(correct["img"], total["img"]),
        "accuracy": pct(correct["all"], total["all"]),
        "no_img_accuracy": pct(correct["no_img"], total["no_img"]),
        "img_questions": total["img"],
    }
    counts = base_counts(len(qs), len(by_id), answer_file) | {"unparsed": failed}
    replicates = mean_replicates(img_hits, SCIENCEQA)
    headline = breakdown["img_accuracy"]
    return result(SCIENCEQA, "img_accuracy", headline, breakdown, counts, answer_file.malformed, replicates)
