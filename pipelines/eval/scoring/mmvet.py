"""MM-Vet, following the official grader ``mm-vet_evaluator.py`` (yuweihao/MM-Vet), one run.

Each answer is graded by the judge with the official few-shot prompt (embedded below verbatim: the judge
protocol is part of the benchmark's definition) followed by ``question | ground truth | prediction | ``
(``<AND>``/``<OR>`` padded with spaces), temperature 0 and 3 tokens. The reply's first space-separated token
must be a number in [0, 1]; failing that (and failing a looser look for such a number), the judge is asked
again with "Predict the correctness of the answer (digit): " appended, at temperatures 0, 0.5, 1.0, 1.5, and
the sample scores 0.0 if none of the five replies parses, as officially. Scores: 100 * mean over the samples
of each capability, over each exact capability set ("capability integration", named by its sorted capabilities
joined with "_") and over all samples (headline).

LLaVA's answers are matched to ``mm-vet.json`` entries as ``v1_<question_id>``
(``convert_mmvet_for_eval.py``). A missing answer scores 0; a sample whose judge request fails is counted and
left out of the means.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.eval.datasets import MMVET
from pipelines.eval.scoring.common import ScoringError, Source, pct, read_answered, read_json
from pipelines.eval.scoring.intervals import mean_replicates
from pipelines.eval.scoring.judge import JudgeClient, judge_all, judged_result, require_judge

GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)
MAX_TOKENS = 3
_NUMBER = re.compile(r"\d*\.?\d+")


def grader_message(question: str, ground_truth: str, prediction: str) -> str:
    """The user message grading one sample."""
    truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return GRADER_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def parse_grade(reply: str) -> float | None:
    """A score in [0, 1] from a reply: the official first-token rule, then the first number; else None."""
    for candidate in (reply.split(" ")[0].strip(), *_NUMBER.findall(reply)[:1]):
        try:
            value = float(candidate)
        except ValueError:
            continue
        if 0.0 <= value <= 1.0:
            return value
    return None


def grade(judge: JudgeClient, question: str, ground_truth: str, prediction: str) -> tuple[float, bool]:
    """(score, parsed) for one sample, re-asking as officially; raises JudgeError if the judge fails."""
    base = grader_message(question, ground_truth, prediction)
    attempts = [(base, 0.0)] + [(base + RETRY_SUFFIX, t) for t in RETRY_TEMPERATURES]
    for content, temperature in attempts:
        reply = judge.complete([{"role": "user", "content": content}], temperature=temperature, max_tokens=MAX_TOKENS)
        value = parse_grade(reply)
        if value is not None:
            return value, True
    return 0.0, False


def _metadata(path: str) -> Mapping[str, Any]:
    p = Path(path)
    data = read_json(p / "mm-vet.json" if p.is_dir() else p, "MM-Vet metadata")
    if not isinstance(data, Mapping):
        raise ScoringError(f"{path}: expected mm-vet.json ({{'v1_0': {{'question', 'answer', 'capability'}}, ...}})")
    return data


def score_mmvet(
    questions: Source, answers: Source, annotations: str | None, judge: JudgeClient | None
) -> dict[str, Any]:
    """Total (headline), per capability and per capability integration; ``annotations``: mm-vet.json."""
    annotations, judge = require_judge("mmvet", annotations, judge, "MM-Vet's mm-vet.json (or the folder holding it)")
    meta = _metadata(annotations)
    answered = read_answered(questions, answers)
    qname, qs, by_id = answered.name, answered.questions, answered.by_id

    samples = []
    for qid, (line, _) in qs.items():
        key = qid if qid in meta else f"v1_{qid}"
        entry = meta.get(key)
        if not isinstance(entry, Mapping) or not {"question", "answer", "capability"} <= entry.keys():
            raise ScoringError(f"{qname}:{line}: question {qid} has no entry {key!r} in {annotations}")
        samples.append((qid, entry))

    def run(sample: tuple[str, Mapping[str, Any]]) -> tuple[float, bool]:
        qid, entry = sample
        if qid not in by_id:  # no request: scores 0
            return 0.0, True
        return grade(judge, str(entry["question"]), str(entry["answer"]), by_id[qid].text)

    judged, errors = judge_all(judge, run, samples, requests=sum(qid in by_id for qid, _ in samples))
    totals: dict[str, list[float]] = defaultdict(list)
    integration: dict[str, list[float]] = defaultdict(list)
    unparsed = 0
    for (_, entry), (value, parsed) in judged:
        unparsed += not parsed
        caps = sorted(set(entry["capability"]))
        for cap in caps:
            totals[cap].append(value)
        integration["_".join(caps)].append(value)
        totals["total"].append(value)
    by_size = sorted(totals.items(), key=lambda kv: (kv[0] == "total", -len(kv[1]), kv[0]))
    breakdown: dict[str, Any] = {
        "total": pct(sum(totals["total"]), len(totals["total"])),
        "capability": {k: pct(sum(v), len(v)) for k, v in by_size if k != "total"},
        "capability_integration": {
            k: pct(sum(v), len(v)) for k, v in sorted(integration.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        },
    }
    counts = {"scored": len(totals["total"])}
    replicates = mean_replicates(totals["total"], MMVET)
    headline = breakdown["total"]
    return judged_result(MMVET, "total score", headline, breakdown, answered, counts, errors, unparsed, replicates)
