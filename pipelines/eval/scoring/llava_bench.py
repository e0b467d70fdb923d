"""LLaVA-Bench-in-the-wild, following LLaVA's ``eval_gpt_review_bench.py`` and ``summarize_gpt_review.py``.

For each question the judge sees the image's context captions, the question, the GPT-4 reference answer as
"Assistant 1" and the model's answer as "Assistant 2", then the rule of the question's category from LLaVA's
``llava/eval/table/rule.json`` (``llava_bench_<category>``; the three categories share one rule, embedded
below, and a ``rule.json`` in the annotations folder overrides it). System prompt, temperature 0.2 and 1024
tokens as there.

The judge's first line holds the two scores. Per category and overall, the relative score is ``100 *
mean(model score) / mean(reference score)``, with both means first rounded to 3 decimals as
``summarize_gpt_review.py`` does. Differences: answers are paired with questions and references by
``question_id`` (LLaVA zips the three files by line); a sample whose review fails or cannot be parsed is
counted and left out (LLaVA keeps it as the pair (-1, -1) in the means), and so is a question without an
answer (counted as missing).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.eval.datasets import LLAVA_BENCH
from pipelines.eval.scoring.common import ScoringError, Source, read_answered, read_json, read_jsonl
from pipelines.eval.scoring.intervals import bootstrap
from pipelines.eval.scoring.judge import JudgeClient, judge_all, judged_result, require_judge

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
# rule.json's "llava_bench_conv" / "_detail" / "_complex" prompt (identical for the three), verbatim: the
# judge protocol is part of the benchmark's definition.
RULE_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question on observing an image. For your "
    "reference, the visual content in the image is represented with a few sentences describing the "
    "image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
TEMPERATURE, MAX_TOKENS = 0.2, 1024
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def review_content(context: str, question: str, reference: str, answer: str, rule: str, role: str = ROLE) -> str:
    """The user message of one review, laid out as in ``eval_gpt_review_bench.py``."""
    return (
        f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule}\n\n"
    )


def parse_scores(review: str) -> tuple[float, float] | None:
    """(reference score, model score) from a review, or None.

    LLaVA's rule first: the first line, commas as spaces, must split on " " into exactly two numbers. Failing
    that, the first line holding exactly two numbers (e.g. "Scores: 8 and 6", "(8, 6)").
    """
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) == 2:
        try:
            return float(parts[0]), float(parts[1])
        except ValueError:
            pass
    for line in review.splitlines():
        numbers = _NUMBER.findall(line)
        if len(numbers) == 2:
            return float(numbers[0]), float(numbers[1])
    return None


def _annotations(folder: str) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    root = Path(folder)
    if not root.is_dir():
        raise ScoringError(f"llava_bench annotations folder not found: {root}")
    contexts = {}
    for line, rec in read_jsonl(root / "context.jsonl", "LLaVA-Bench context"):
        if "image" not in rec or "caption" not in rec:
            raise ScoringError(f"{root / 'context.jsonl'}:{line}: needs 'image' and 'caption'")
        cap = rec["caption"]
        contexts[str(rec["image"])] = "\n".join(cap) if isinstance(cap, list) else str(cap)
    references = {}
    for line, rec in read_jsonl(root / "answers_gpt4.jsonl", "LLaVA-Bench reference answers"):
        if "question_id" not in rec or "text" not in rec:
            raise ScoringError(f"{root / 'answers_gpt4.jsonl'}:{line}: needs 'question_id' and 'text'")
        references[str(rec["question_id"])] = str(rec["text"])
    rules = read_json(root / "rule.json", "LLaVA rule") if (root / "rule.json").is_file() else {}
    return contexts, references, rules


def _relative(pairs: list[tuple[float, float]]) -> dict[str, float]:
    ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
    model = round(sum(p[1] for p in pairs) / len(pairs), 3)
    return {
        "relative_score": 100.0 * model / ref if ref else 0.0,
        "reference_score": ref * 10,
        "model_score": model * 10,
        "samples": len(pairs),
    }


def score_llava_bench(
    questions: Source, answers: Source, annotations: str | None, judge: JudgeClient | None
) -> dict[str, Any]:
    """Relative score per category and overall (headline); ``annotations``: llava-bench-in-the-wild dir."""
    folder = "the folder with context.jsonl and answers_gpt4.jsonl"
    annotations, judge = require_judge("llava_bench", annotations, judge, folder)
    contexts, references, rules = _annotations(annotations)
    answered = read_answered(questions, answers)
    qname, qs, by_id = answered.name, answered.questions, answered.by_id

    jobs = []
    for qid, (line, q) in qs.items():
        category = str(q.get("category", ""))
        if str(q.get("image")) not in contexts or qid not in references:
            raise ScoringError(f"{qname}:{line}: question {qid} has no context or reference answer in {annotations}")
        rule = {"prompt": RULE_PROMPT, "role": ROLE}
        if rules:
            if f"llava_bench_{category}" not in rules:
                raise ScoringError(f"{qname}:{line}: category llava_bench_{category} is not in the rule file")
            rule = rules[f"llava_bench_{category}"]
            if not isinstance(rule, Mapping) or not {"prompt", "role"} <= rule.keys():
                raise ScoringError(f"{annotations}/rule.json: llava_bench_{category} needs 'prompt' and 'role'")
        if qid in by_id:
            content = review_content(
                contexts[str(q["image"])],
                str(q["text"]),
                references[qid],
                by_id[qid].text,
                rule["prompt"],
                rule["role"],
            )
            jobs.append((category, content))

    def review(job: tuple[str, str]) -> tuple[float, float] | None:
        messages: list[Mapping[str, str]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": job[1]},
        ]
        return parse_scores(judge.complete(messages, temperature=TEMPERATURE, max_tokens=MAX_TOKENS))

    judged, errors = judge_all(judge, review, jobs)
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    unparsed = 0
    for (category, _), scores in judged:
        if scores is None:
            unparsed += 1
        else:
            pairs[category].append(scores)
            pairs["all"].append(scores)
    breakdown = {k: _relative(v) for k, v in sorted(pairs.items()) if v}
    headline = breakdown["all"]["relative_score"] if "all" in breakdown else 0.0
    counts = {"judged": len(pairs.get("all", []))}
    reference, model = (np.array([p[i] for p in pairs.get("all", [])], dtype=np.float64) for i in (0, 1))  # (n,)
    replicates = bootstrap(  # the ratio of the two means over resampled questions (unrounded)
        len(reference), lambda counts: 100 * (counts @ model) / np.maximum(counts @ reference, 1e-12), LLAVA_BENCH
    )
    return judged_result(
        LLAVA_BENCH, "relative score", headline, breakdown, answered, counts, errors, unparsed, replicates
    )
