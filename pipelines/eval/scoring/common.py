"""Reading question, answer and annotation files, and the shape every scorer returns.

Files are read strictly (a malformed question or annotation file, bytes that are not UTF-8 included, is an error
naming the file and line), except answer files: a malformed answer line is counted and reported, and the rest is
scored (a line that is not UTF-8 is one of them). Question ids are compared as strings (LLaVA writes ints for
some benchmarks and strings for others). A question with no answer is scored as wrong and counted as
``missing``; an answer whose id is not a question is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipelines.eval.scoring.intervals import interval
from pipelines.storage import NotUtf8Error, decode_utf8

Records = Sequence[Mapping[str, Any]]
Source = str | os.PathLike | Records


class ScoringError(ValueError):
    """Bad input for a scorer; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Answer:
    """One model answer (a line of LLaVA's answers jsonl)."""

    qid: str
    text: str
    line: int
    record: Mapping[str, Any]


@dataclass
class AnswerFile:
    """The answers read from one file (or list), with the lines that could not be read."""

    source: str
    answers: list[Answer]
    malformed: list[str] = field(default_factory=list)


def source_name(src: Source) -> str:
    return str(src) if isinstance(src, str | os.PathLike) else "<in-memory records>"


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ScoringError(f"{what} file not found: {p}")
    return p


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a whole JSON file; errors name the file, line and column."""
    p = _existing(path, what)
    try:
        return json.loads(decode_utf8(p.read_bytes(), str(p)))
    except NotUtf8Error as e:
        raise ScoringError(f"{p}:{e.line}: {what} file is {e.problem}") from None
    except json.JSONDecodeError as e:
        raise ScoringError(f"{p}:{e.lineno}:{e.colno}: {what} file is not valid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is an error naming file and line."""
    p = _existing(path, what)
    out = []
    for n, line in enumerate(p.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(decode_utf8(line, str(p), n))
        except NotUtf8Error as e:
            raise ScoringError(f"{p}:{n}: {what} line is {e.problem}") from None
        except json.JSONDecodeError as e:
            raise ScoringError(f"{p}:{n}: {what} line is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ScoringError(f"{p}:{n}: {what} line is not a JSON object")
        out.append((n, obj))
    return out


def read_tsv(path: str | os.PathLike, what: str) -> list[tuple[int, dict[str, str]]]:
    """(row number, row) of a tab-separated file with a header (MMBench); the first data row is 1."""
    p = _existing(path, what)
    csv.field_size_limit(sys.maxsize)  # MMBench rows carry base64 images
    try:
        text = decode_utf8(p.read_bytes(), str(p))
    except NotUtf8Error as e:
        raise ScoringError(f"{p}:{e.line}: {what} file is {e.problem}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    return [(n, dict(row)) for n, row in enumerate(reader, start=1)]


def question_records(src: Source, what: str = "questions") -> tuple[str, list[tuple[int, Mapping[str, Any]]]]:
    """A question source as (name, [(line, record)]): a jsonl path or an in-memory list."""
    if isinstance(src, str | os.PathLike):
        return str(src), read_jsonl(src, what)
    return source_name(src), [(i, r) for i, r in enumerate(src, start=1)]


def index_questions(
    name: str, records: Iterable[tuple[int | str, Mapping[str, Any]]], id_key: str = "question_id"
) -> dict[str, tuple[int | str, Mapping[str, Any]]]:
    """Questions by id, with their line (or "[i]" in a JSON list); a missing or repeated id is an error."""
    out: dict[str, tuple[int | str, Mapping[str, Any]]] = {}
    for line, rec in records:
        if id_key not in rec:
            raise ScoringError(f"{name}:{line}: question has no {id_key!r}")
        qid = str(rec[id_key])
        if qid in out:
            raise ScoringError(f"{name}:{line}: question id {qid} repeats line {out[qid][0]}")
        out[qid] = (line, rec)
    return out


def _answer_from(rec: Any, line: int) -> Answer | str:
    if not isinstance(rec, Mapping):
        return "not a JSON object"
    if "question_id" not in rec:
        return "no 'question_id'"
    if not isinstance(rec.get("text"), str):
        return "no string 'text'"
    return Answer(str(rec["question_id"]), rec["text"], line, rec)


def load_answers(src: Source) -> AnswerFile:
    """Read LLaVA answers (jsonl path or list of dicts); malformed lines become "file:line: why" messages."""
    name = source_name(src)
    answers: list[Answer] = []
    malformed: list[str] = []
    if isinstance(src, str | os.PathLike):
        p = _existing(src, "answers")
        for n, line in enumerate(p.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                parsed = _answer_from(json.loads(decode_utf8(line, name, n)), n)
            except NotUtf8Error as e:
                parsed = e.problem
            except json.JSONDecodeError as e:
                parsed = f"not valid JSON ({e.msg})"
            if isinstance(parsed, str):
                malformed.append(f"{name}:{n}: malformed answer line: {parsed}")
            else:
                answers.append(parsed)
    else:
        for n, rec in enumerate(src, start=1):
            parsed = _answer_from(rec, n)
            if isinstance(parsed, str):
                malformed.append(f"{name}:{n}: malformed answer record: {parsed}")
            else:
                answers.append(parsed)
    return AnswerFile(name, answers, malformed)


def check_known(answers: AnswerFile, known: Mapping[str, Any], questions_name: str) -> None:
    """Every answer must answer a known question."""
    for a in answers.answers:
        if a.qid not in known:
            raise ScoringError(
                f"{answers.source}:{a.line}: answer for question_id {a.qid}, which is not in {questions_name}"
            )


def answers_by_id(answers: AnswerFile, known: Mapping[str, Any], questions_name: str) -> dict[str, Answer]:
    """One answer per known question id; unknown ids and duplicates are errors naming the lines."""
    check_known(answers, known, questions_name)
    out: dict[str, Answer] = {}
    for a in answers.answers:
        if a.qid in out:
            raise ScoringError(
                f"{answers.source}:{a.line}: second answer for question_id {a.qid} (first at line {out[a.qid].line})"
            )
        out[a.qid] = a
    return out


class Answered(NamedTuple):
    """A benchmark's questions by id and the answers to them (:func:`read_answered`)."""

    name: str  # of the question source
    questions: dict[str, tuple[int | str, Mapping[str, Any]]]  # id -> (line, record)
    file: AnswerFile
    by_id: dict[str, Answer]


def read_answered(questions: Source, answers: Source) -> Answered:
    """A LLaVA question jsonl (or list) and its answers, paired by question id (errors as in
    :func:`index_questions` and :func:`answers_by_id`)."""
    name, records = question_records(questions)
    qs = index_questions(name, records)
    answer_file = load_answers(answers)
    return Answered(name, qs, answer_file, answers_by_id(answer_file, qs, name))


def pct(num: float, den: float) -> float:
    """100 * num / den, or 0.0 for an empty denominator."""
    return 100.0 * num / den if den else 0.0


def result(
    benchmark: str,
    metric: str,
    score: float,
    breakdown: Mapping[str, Any],
    counts: Mapping[str, int],
    warnings: Sequence[str],
    replicates: np.ndarray,
) -> dict[str, Any]:
    """The dict every scorer returns: the headline ``score`` (percent, as published) named by ``metric``, its
    bootstrap ``replicates`` (R,) and their 95% ``interval`` (low, high) (:mod:`pipelines.eval.scoring.intervals`)."""
    return {
        "benchmark": benchmark,
        "metric": metric,
        "score": score,
        "interval": interval(replicates),
        "breakdown": dict(breakdown),
        "counts": dict(counts),
        "warnings": list(warnings),
        "replicates": replicates,
    }


def base_counts(n_questions: int, n_answered: int, answers: AnswerFile) -> dict[str, int]:
    return {
        "questions": n_questions,
        "answered": n_answered,
        "missing": n_questions - n_answered,
        "malformed_lines": len(answers.malformed),
    }


def no_annotations(benchmark: str, annotations: Any) -> None:
    if annotations is not None:
        raise ScoringError(f"{benchmark} takes no annotations: its ground truth is in the questions file")
