"""Score a benchmark's answers as LLaVA-1.5's published numbers were computed.

    python -m pipelines.eval.score --benchmark pope --questions llava_pope_test.jsonl --answers answers.jsonl \\
        --annotations pope/coco [--json]

LLaVA-Bench and MM-Vet also need a judge: ``--judge-base-url https://api.openai.com/v1 --judge-model
gpt-4-0314`` (the key is read from the variable named by ``--judge-api-key-env``, OPENAI_API_KEY by default,
and never printed). Exit status: 0 scored, 2 bad input (the message names the file and line). Warnings
(malformed answer lines, judge failures) go to stderr and into the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.eval.datasets import BENCHMARKS
from pipelines.eval.scoring import JudgeClient, ScoringError, score

_MAX_WARNINGS_SHOWN = 10


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.eval.score", description=__doc__.split("\n")[0])
    p.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--questions", required=True, help="LLaVA question file (jsonl; ScienceQA json; MMBench tsv)")
    p.add_argument("--answers", required=True, help="answers jsonl in LLaVA's format")
    p.add_argument("--annotations", help="ground truth file or folder, where the benchmark has its own")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    judge = p.add_argument_group("LLM judge (llava_bench, mmvet)")
    judge.add_argument("--judge-base-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", help="judge model name, e.g. gpt-4-0314 (LLaVA-Bench), gpt-4-0613 (MM-Vet)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    judge.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")
    judge.add_argument("--judge-retries", type=int, default=5, help="retries per request, with backoff")
    return p.parse_args(argv)


def make_judge(args: argparse.Namespace) -> JudgeClient | None:
    if not args.judge_base_url and not args.judge_model:
        return None
    if not (args.judge_base_url and args.judge_model):
        raise ScoringError("the judge needs both --judge-base-url and --judge-model")
    return JudgeClient(
        base_url=args.judge_base_url,
        model=args.judge_model,
        api_key_env=args.judge_api_key_env or None,
        workers=args.judge_workers,
        max_retries=args.judge_retries,
    )


def _rows(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [row for k, v in value.items() for row in _rows(f"{prefix}{k}/", v)]
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return [(prefix.rstrip("/"), text)]


def format_table(res: Mapping[str, Any]) -> str:
    """A small readable table: headline, breakdown, counts."""
    low, high = res["interval"]
    rows = [("benchmark", res["benchmark"]), (res["metric"], f"{res['score']:.2f} (95% CI {low:.2f} - {high:.2f})")]
    rows += _rows("", res["breakdown"]) + _rows("counts/", res["counts"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = score(args.benchmark, args.questions, args.answers, args.annotations, make_judge(args))
    except ScoringError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warnings = res["warnings"]
    for w in warnings[:_MAX_WARNINGS_SHOWN]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > _MAX_WARNINGS_SHOWN:
        print(f"warning: ... and {len(warnings) - _MAX_WARNINGS_SHOWN} more", file=sys.stderr)
    shown = {k: v for k, v in res.items() if k != "replicates"}  # the interval is shown; its resamples are not
    print(json.dumps(shown, indent=2, ensure_ascii=False) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
