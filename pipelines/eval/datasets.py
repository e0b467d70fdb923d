"""The benchmarks LLaVA-1.5 reports, their names here, and the prompt text LLaVA-1.5 sends for each question.

The suffixes are the ones in LLaVA's evaluation question files and ``llava/eval/model_vqa_*.py``:

- short-answer VQA (VQAv2, GQA, TextVQA) and POPE: "Answer the question using a single word or phrase."
- VizWiz: the "Unanswerable" instruction, then the short-answer line;
- ScienceQA-IMG and MMBench (``--single-pred-prompt``): "Answer with the option's letter from the given
  choices directly."; MMBench-CN (``--lang cn``): "请直接回答选项字母。";
- LLaVA-Bench-in-the-wild and MM-Vet: no suffix (free-form answers graded by an LLM judge).

Doubling: LLaVA's jsonl question files for VQAv2, GQA, VizWiz, TextVQA and POPE already end with their suffix,
while ScienceQA (conversation JSON) and MMBench (tsv) get it appended at inference. :func:`build_prompt`
therefore removes any trailing lines of the text that are lines of the benchmark's suffix (so a full, partial
or absent suffix are all handled) and then appends the full suffix once: the result is the same whichever form
the file has, and applying it to its own output changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

VQAV2, GQA, VIZWIZ, SCIENCEQA, TEXTVQA = "vqav2", "gqa", "vizwiz", "scienceqa", "textvqa"
POPE, MMBENCH, MMBENCH_CN, LLAVA_BENCH, MMVET = "pope", "mmbench", "mmbench_cn", "llava_bench", "mmvet"

# In the order of the LLaVA-1.5 paper's results table.
BENCHMARKS: tuple[str, ...] = (
    VQAV2,
    GQA,
    VIZWIZ,
    SCIENCEQA,
    TEXTVQA,
    POPE,
    MMBENCH,
    MMBENCH_CN,
    LLAVA_BENCH,
    MMVET,
)

_ALIASES = {
    "vqa_v2": VQAV2,
    "vizwiz_vqa": VIZWIZ,
    "sqa": SCIENCEQA,
    "scienceqa_img": SCIENCEQA,
    "sqa_img": SCIENCEQA,
    "text_vqa": TEXTVQA,
    "mmbench_en": MMBENCH,
    "mmb": MMBENCH,
    "mmb_cn": MMBENCH_CN,
    "llava_bench_in_the_wild": LLAVA_BENCH,
    "llavabench": LLAVA_BENCH,
    "llava_w": LLAVA_BENCH,
    "mm_vet": MMVET,
}

SHORT_ANSWER = "Answer the question using a single word or phrase."
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"

PROMPT_SUFFIX: dict[str, str | None] = {
    VQAV2: SHORT_ANSWER,
    GQA: SHORT_ANSWER,
    VIZWIZ: VIZWIZ_SUFFIX,
    SCIENCEQA: OPTION_LETTER,
    TEXTVQA: SHORT_ANSWER,
    POPE: SHORT_ANSWER,
    MMBENCH: OPTION_LETTER,
    MMBENCH_CN: OPTION_LETTER_CN,
    LLAVA_BENCH: None,
    MMVET: None,
}

IMAGE_PLACEHOLDER = "<image>"
OPTION_LETTERS = ("A", "B", "C", "D")


def canonical_name(name: str) -> str:
    """Map a benchmark name as users write it ("MMBench-CN", "llava-bench-in-the-wild") to its name here."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return key


def with_suffix(text: str, suffix: str | None) -> str:
    """``text`` ending with ``suffix`` exactly once (see the module docstring for how doubling is avoided)."""
    if not suffix:
        return text
    suffix_lines = set(suffix.split("\n"))
    lines = text.rstrip("\n").split("\n")
    while lines and lines[-1].strip() in suffix_lines:
        lines.pop()
    return "\n".join(lines + [suffix])


def is_missing(value: Any) -> bool:
    """LLaVA's ``is_none`` for tsv cells: None, NaN, "nan" / "none" in any case; also empty."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def mmbench_options(row: Mapping[str, Any]) -> list[str]:
    """The options of an MMBench tsv row, A first, stopping at the first missing one (as LLaVA does)."""
    options = []
    for letter in OPTION_LETTERS:
        if is_missing(row.get(letter)):
            break
        options.append(str(row[letter]))
    return options


def mmbench_question(row: Mapping[str, Any], options: list[str] | None = None) -> str:
    """Hint, question and "A. option" lines of an MMBench row, as ``model_vqa_mmbench.py`` joins them."""
    question = str(row["question"])
    if not is_missing(row.get("hint")):
        question = f"{row['hint']}\n{question}"
    for letter, option in zip(OPTION_LETTERS, mmbench_options(row) if options is None else options, strict=False):
        question += f"\n{letter}. {option}"
    return question


def build_prompt(benchmark: str, record: Mapping[str, Any]) -> str:
    """The text LLaVA-1.5 sends for one question record, without the image token.

    ``record`` is a line of LLaVA's question jsonl (``text``), a ScienceQA conversation record
    (``conversations``) or an MMBench tsv row (``question``, ``hint``, ``A``..``D``), according to the
    benchmark.
    """
    benchmark = canonical_name(benchmark)
    suffix = PROMPT_SUFFIX[benchmark]
    if benchmark == SCIENCEQA and "conversations" in record:
        text = str(record["conversations"][0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip()
    elif benchmark in (MMBENCH, MMBENCH_CN) and "question" in record and "text" not in record:
        text = mmbench_question(record)
    else:
        text = str(record["text"])
    return with_suffix(text, suffix)
