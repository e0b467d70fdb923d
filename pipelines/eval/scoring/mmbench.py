"""MMBench (en and cn): circular evaluation after the official evaluator (VLMEvalKit ``mcq_circular_eval``).

Circular variants of a question are the tsv rows whose ``index`` agrees modulo 1,000,000 (the shifted copies
carry ``index + k * 1e6``), plus, for answers written by LLaVA's ``model_vqa_mmbench.py --all-rounds``, the
extra ``round_id`` rounds of a row, whose options are rotated as their ``options`` / ``option_char`` fields
record. A question counts as correct only when every variant is answered and its extracted option is the
variant's answer.

The option is extracted from free text with the evaluator's rules, without its LLM fallback ("exact
matching"):

1. option letter: replace ``.()[],:;!*#{}`` by spaces and split on whitespace; if exactly one option letter is
   among the words, that letter (so "A dog" reads as A, a quirk kept from the original); if none is and "Z"
   is, "Z"; a known refusal phrase also gives "Z";
2. otherwise option content: the options whose lower-cased text occurs in the lower-cased answer; exactly one
   wins.

Later VLMEvalKit versions add heuristics (where in the answer the letter sits, a length limit on content
matching); they are not followed. The headline is circular accuracy over the questions (rows with ``index <
1e6``), also given per ``category`` and ``l2-category``; ``vanilla`` is single-pass accuracy on those rows.
Cells are missing as in LLaVA's ``is_none`` (empty, "nan", "none").
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from pipelines.eval.datasets import OPTION_LETTERS, is_missing, mmbench_options
from pipelines.eval.scoring.common import (
    Answer,
    ScoringError,
    Source,
    base_counts,
    check_known,
    index_questions,
    load_answers,
    pct,
    read_tsv,
    result,
    source_name,
)
from pipelines.eval.scoring.intervals import mean_replicates

CIRCULAR_STRIDE = 1_000_000
_SEPARATORS = ".()[],:;!*#{}"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def infer_option_letter(answer: str, choices: Mapping[str, str]) -> str | None:
    """Rule 1: a single option letter standing alone in the answer ("Z" for refusals), else None."""
    if any(r in answer for r in _REFUSALS):
        return "Z"
    words = "".join(" " if c in _SEPARATORS else c for c in answer).split()
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def infer_option_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """Rule 2: the only option whose text occurs in the answer (case-insensitive), else None."""
    answer = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option an answer picks (a letter, "Z" for none of them) or None when it cannot be told."""
    return infer_option_letter(answer, choices) or infer_option_text(answer, choices)


def _variant(row: Mapping[str, Any], ans: Answer, where: str) -> tuple[dict[str, str], str]:
    """The choices as shown to the model for this answer, and the letter that is right among them."""
    options, truth = mmbench_options(row), str(row["answer"]).strip()
    shown, original = ans.record.get("options"), ans.record.get("option_char")
    if isinstance(shown, list) and isinstance(original, list) and len(shown) == len(original) == len(options):
        if truth not in original:
            raise ScoringError(f"{where}: 'option_char' {original} does not contain the answer {truth!r}")
        return dict(zip(OPTION_LETTERS, map(str, shown), strict=False)), OPTION_LETTERS[original.index(truth)]
    return dict(zip(OPTION_LETTERS, options, strict=False)), truth


def _row_hits(row: Mapping[str, Any], answered: Mapping[int, Answer], source: str) -> tuple[list[bool], int]:
    """Whether each expected round of one row is right (an unanswered round is not), and how many answers
    gave no option. One round, or one per option when LLaVA's ``--all-rounds`` answers are present."""
    all_rounds = any(rnd > 0 for rnd in answered)
    hits, unparsed = [], 0
    for rnd in range(len(mmbench_options(row)) if all_rounds else 1):
        ans = answered.get(rnd)
        if ans is None:
            hits.append(False)
            continue
        choices, truth = _variant(row, ans, f"{source}:{ans.line}")
        picked = extract_option(ans.text, choices)
        unparsed += picked is None
        hits.append(picked == truth)
    return hits, unparsed


def score_mmbench(benchmark: str, questions: Source, answers: Source, annotations: str | None) -> dict[str, Any]:
    """Circular accuracy (headline), per category and l2-category, and vanilla accuracy."""
    if annotations is not None:
        raise ScoringError(f"{benchmark} takes no annotations: the answers are in the tsv's 'answer' column")
    qname = source_name(questions)
    if isinstance(questions, str | os.PathLike):
        rows_src: list[tuple[int, Mapping[str, Any]]] = list(read_tsv(questions, "MMBench tsv"))
    else:
        rows_src = list(enumerate(questions, start=1))
    rows = index_questions(qname, rows_src, id_key="index")
    for qid, (line, row) in rows.items():
        if is_missing(row.get("answer")):
            raise ScoringError(
                f"{qname}: row {line} (index {qid}) has no answer (test splits are scored by the server)"
            )
        if not qid.lstrip("-").isdigit():
            raise ScoringError(f"{qname}: row {line} has a non-integer index {qid!r}")
    answer_file = load_answers(answers)
    check_known(answer_file, rows, qname)

    by_row: dict[str, dict[int, Answer]] = defaultdict(dict)
    for a in answer_file.answers:
        try:
            rnd = int(a.record.get("round_id") or 0)
        except (TypeError, ValueError):
            raise ScoringError(f"{answer_file.source}:{a.line}: 'round_id' is not an integer") from None
        if rnd in by_row[a.qid]:
            raise ScoringError(f"{answer_file.source}:{a.line}: second answer for index {a.qid} round {rnd}")
        by_row[a.qid][rnd] = a

    groups: dict[int, list[str]] = defaultdict(list)
    for qid in rows:
        groups[int(qid) % CIRCULAR_STRIDE].append(qid)
    circular: dict[str, list[bool]] = defaultdict(list)
    vanilla, unparsed = [], 0
    for g, members in groups.items():
        main = rows.get(str(g))
        if main is None:
            continue  # shifted copies without their original row are not questions (as officially)
        hits = []
        for qid in members:
            row_hits, row_unparsed = _row_hits(rows[qid][1], by_row.get(qid, {}), answer_file.source)
            hits += row_hits
            unparsed += row_unparsed
            if qid == str(g):
                vanilla.append(row_hits[0])  # round 0 of the original row: the single-pass answer
        circular["overall"].append(all(hits))
        for column in ("category", "l2-category"):
            if not is_missing(main[1].get(column)):
                circular[f"{column}/{main[1][column]}"].append(all(hits))
    breakdown: dict[str, Any] = {
        "circular": pct(sum(circular["overall"]), len(circular["overall"])),
        "vanilla": pct(sum(vanilla), len(vanilla)),
    }
    for column in ("l2-category", "category"):
        keys = sorted(k for k in circular if k.startswith(column + "/"))
        if keys:
            breakdown[column] = {k.split("/", 1)[1]: pct(sum(circular[k]), len(circular[k])) for k in keys}
    counts = base_counts(len(rows), len(by_row), answer_file) | {
        "questions_circular": len(circular["overall"]),
        "unparsed": unparsed,
    }
    replicates = mean_replicates(circular["overall"], benchmark)  # over questions, each with its circular passes
    headline = breakdown["circular"]
    return result(benchmark, "circular accuracy", headline, breakdown, counts, answer_file.malformed, replicates)
