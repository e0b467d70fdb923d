"""Benchmark scorers that compute LLaVA-1.5's published numbers, one module per rule family.

``score(benchmark, questions, answers, annotations, judge)`` dispatches on the benchmark name and returns::

    {"benchmark": "pope", "metric": "f1 (mean over splits)", "score": 85.9...,   # headline, percent
     "breakdown": {...}, "counts": {"questions", "answered", "missing", "malformed_lines", ...},
     "warnings": ["answers.jsonl:12: malformed answer line: ...", ...]}

``questions`` and ``answers`` are paths (the LLaVA evaluation files) or in-memory lists of records;
``annotations`` is the path of the benchmark's ground truth where it has its own (see each module), and
``judge`` an OpenAI-compatible :class:`JudgeClient` for LLaVA-Bench and MM-Vet.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pipelines.eval.datasets import (
    GQA,
    LLAVA_BENCH,
    MMBENCH,
    MMBENCH_CN,
    MMVET,
    POPE,
    SCIENCEQA,
    TEXTVQA,
    VIZWIZ,
    VQAV2,
    canonical_name,
)
from pipelines.eval.scoring.common import ScoringError, Source
from pipelines.eval.scoring.gqa import score_gqa
from pipelines.eval.scoring.judge import JudgeClient, JudgeError
from pipelines.eval.scoring.llava_bench import score_llava_bench
from pipelines.eval.scoring.mmbench import score_mmbench
from pipelines.eval.scoring.mmvet import score_mmvet
from pipelines.eval.scoring.pope import score_pope
from pipelines.eval.scoring.scienceqa import score_scienceqa
from pipelines.eval.scoring.toy import TOY_BENCHMARK, score_toy
from pipelines.eval.scoring.vqa import score_vqa

Scorer = Callable[[Source, Source, str | None, JudgeClient | None], dict[str, Any]]

SCORERS: dict[str, Scorer] = {
    VQAV2: lambda q, a, ann, judge: score_vqa(VQAV2, q, a, ann),
    GQA: lambda q, a, ann, judge: score_gqa(q, a, ann),
    VIZWIZ: lambda q, a, ann, judge: score_vqa(VIZWIZ, q, a, ann),
    SCIENCEQA: lambda q, a, ann, judge: score_scienceqa(q, a, ann),
    TEXTVQA: lambda q, a, ann, judge: score_vqa(TEXTVQA, q, a, ann),
    POPE: lambda q, a, ann, judge: score_pope(q, a, ann),
    MMBENCH: lambda q, a, ann, judge: score_mmbench(MMBENCH, q, a, ann),
    MMBENCH_CN: lambda q, a, ann, judge: score_mmbench(MMBENCH_CN, q, a, ann),
    LLAVA_BENCH: score_llava_bench,
    MMVET: score_mmvet,
    TOY_BENCHMARK: lambda q, a, ann, judge: score_toy(q, a, ann),  # the project's synthetic benchmark (not LLaVA's)
}
JUDGED = frozenset({LLAVA_BENCH, MMVET})


def score(
    benchmark: str,
    questions: Source,
    answers: Source,
    annotations: str | os.PathLike | None = None,
    judge: JudgeClient | None = None,
) -> dict[str, Any]:
    """Score one benchmark's answers; raises :class:`ScoringError` (naming file and line) on bad input."""
    try:
        name = TOY_BENCHMARK if benchmark.strip().lower() == TOY_BENCHMARK else canonical_name(benchmark)
    except ValueError as e:
        raise ScoringError(str(e)) from None
    return SCORERS[name](questions, answers, None if annotations is None else str(annotations), judge)


__all__ = ["JUDGED", "SCORERS", "TOY_BENCHMARK", "JudgeClient", "JudgeError", "ScoringError", "score"]
