"""A small client for any OpenAI-compatible chat-completions endpoint, used as the LLM judge, and the skeleton the
judged scorers (``llava_bench``, ``mmvet``) share: what they require, their requests in flight, their result.

The API key is read from an environment variable at each request and only ever placed in the ``Authorization``
header: it is not stored on the object, not in its repr, and not in any error message. Transient failures
(connection errors, timeouts, HTTP 408/409/429/5xx, a reply that is not a chat completion) are retried with
exponential backoff, honouring ``Retry-After``; other HTTP errors fail at once. A request that still fails
raises :class:`JudgeError`, which the judged scorers count per sample instead of stopping.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pipelines.eval.scoring.common import Answered, ScoringError, base_counts, result

T = TypeVar("T")
R = TypeVar("R")

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge could not be reached or did not answer with a chat completion."""


def raise_if_all_failed(errors: Sequence[JudgeError], requested: int) -> None:
    """One failed sample is counted, not fatal; a judge that failed every request is (bad URL, key, model)."""
    if errors and len(errors) == requested:
        raise ScoringError(f"every one of the {requested} judge requests failed; first: {errors[0]}")


@dataclass(frozen=True)
class JudgeClient:
    """POSTs ``{base_url}/chat/completions``; ``base_url`` is e.g. ``https://api.openai.com/v1``."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    workers: int = 4

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def _request(self, payload: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=payload, headers=headers, method="POST")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)

    def complete(self, messages: Sequence[Mapping[str, str]], *, temperature: float, max_tokens: int) -> str:
        """The content of the first choice of one chat completion."""
        payload = json.dumps(
            {
                "model": self.model,
                "messages": list(messages),
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
        ).encode()
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                with urllib.request.urlopen(self._request(payload), timeout=self.timeout_s) as resp:
                    body = resp.read()
                try:
                    content = json.loads(body)["choices"][0]["message"]["content"]
                    return content if isinstance(content, str) else ""
                except (ValueError, KeyError, IndexError, TypeError):
                    last = f"reply is not a chat completion: {body[:200]!r}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge at {self.url} answered {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated replies
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise JudgeError(f"judge at {self.url} failed after {self.max_retries + 1} attempts ({last})")

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` with ``workers`` requests in flight, results in input order."""
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(fn, items))


def require_judge(
    benchmark: str, annotations: str | None, judge: JudgeClient | None, annotations_are: str
) -> tuple[str, JudgeClient]:
    """The annotations (``annotations_are`` says what they are) and the judge a judged benchmark is scored with."""
    if annotations is None:
        raise ScoringError(f"{benchmark} needs --annotations: {annotations_are}")
    if judge is None:
        raise ScoringError(f"{benchmark} needs an LLM judge (--judge-base-url and --judge-model)")
    return annotations, judge


def judge_all(
    judge: JudgeClient, ask: Callable[[T], R], items: Sequence[T], requests: int | None = None
) -> tuple[list[tuple[T, R]], list[JudgeError]]:
    """``ask`` over ``items`` with the judge's ``workers`` in flight: the (item, outcome) pairs, in order, of the items
    the judge answered, and the errors of the others (counted per sample, not fatal, unless every one of the
    ``requests`` failed: one per item unless given)."""

    def attempt(item: T) -> R | JudgeError:
        try:
            return ask(item)
        except JudgeError as e:
            return e

    judged, errors = [], []
    for item, outcome in zip(items, judge.map(attempt, items), strict=True):
        if isinstance(outcome, JudgeError):
            errors.append(outcome)
        else:
            judged.append((item, outcome))
    raise_if_all_failed(errors, len(items) if requests is None else requests)
    return judged, errors


def judged_result(
    benchmark: str,
    metric: str,
    score: float,
    breakdown: Mapping[str, Any],
    answered: Answered,
    counts: Mapping[str, int],
    errors: Sequence[JudgeError],
    unparsed: int,
    replicates: np.ndarray,
) -> dict[str, Any]:
    """A judged scorer's result: the base counts, its own ``counts``, the judge's failures and unparsed replies;
    the malformed answer lines and the judge's errors as warnings."""
    counts = base_counts(len(answered.questions), len(answered.by_id), answered.file) | dict(counts)
    counts |= {"judge_failures": len(errors), "unparsed": unparsed}
    warnings = answered.file.malformed + [str(e) for e in errors]
    return result(benchmark, metric, score, breakdown, counts, warnings, replicates)
