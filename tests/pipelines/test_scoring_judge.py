"""LLM-judged benchmarks against a fake OpenAI-compatible server on loopback: prompts, retries, failures."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipelines.eval.score import main
from pipelines.eval.scoring import JudgeClient, JudgeError, ScoringError, score
from pipelines.eval.scoring.llava_bench import RULE_PROMPT, SYSTEM_PROMPT, parse_scores, review_content
from pipelines.eval.scoring.mmvet import RETRY_SUFFIX, grader_message, parse_grade

SECRET = "sk-test-do-not-print-0123456789"
Reply = tuple[int, str]  # (HTTP status, assistant content; the raw body for errors or when prefixed "RAW:")


class FakeJudge:
    """Records each request and answers with ``responder(request_json)``."""

    def __init__(self, responder: Callable[[dict[str, Any]], Reply]) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body | {"_path": self.path})
                fake.auth.append(self.headers.get("Authorization"))
                status, content = fake.responder(body)
                if status == 200 and not content.startswith("RAW:"):
                    content = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                payload = content.removeprefix("RAW:").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def client(self, **kw: Any) -> JudgeClient:
        return JudgeClient(self.base_url, "judge-model", api_key_env="FAKE_JUDGE_KEY", backoff_s=0.001, **kw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[dict], Reply]], FakeJudge]]:
    monkeypatch.setenv("FAKE_JUDGE_KEY", SECRET)
    servers: list[FakeJudge] = []

    def start(responder: Callable[[dict], Reply]) -> FakeJudge:
        servers.append(FakeJudge(responder))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _user(req: dict) -> str:
    return req["messages"][-1]["content"]


def test_client_sends_key_and_retries_transient_errors(fake_judge) -> None:
    replies = iter([(503, "busy"), (429, "slow down"), (200, "RAW:not json"), (200, "RAW:{}"), (200, "8 6")])
    judge = fake_judge(lambda req: next(replies))
    client = judge.client()
    out = client.complete([{"role": "user", "content": "hi"}], temperature=0.2, max_tokens=5)
    assert out == "8 6"
    assert len(judge.requests) == 5
    assert judge.requests[0]["_path"] == "/v1/chat/completions"
    assert judge.requests[0]["model"] == "judge-model" and judge.requests[0]["max_tokens"] == 5
    assert judge.auth == [f"Bearer {SECRET}"] * 5
    assert SECRET not in repr(client)


def test_client_gives_up_without_leaking_the_key(fake_judge) -> None:
    judge = fake_judge(lambda req: (400, "bad request"))
    with pytest.raises(JudgeError, match="HTTP 400") as err:
        judge.client().complete([{"role": "user", "content": "x"}], temperature=0, max_tokens=1)
    assert len(judge.requests) == 1  # not retried
    assert SECRET not in str(err.value)
    judge.responder = lambda req: (500, "oops")
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.client(max_retries=2).complete([{"role": "user", "content": "x"}], temperature=0, max_tokens=1)


def test_parse_scores_and_grades() -> None:
    assert parse_scores("8 6\nAssistant 1 was ...") == (8.0, 6.0)
    assert parse_scores("7,7\n...") == (7.0, 7.0)
    assert parse_scores("Scores: 9 and 6.5\n") == (9.0, 6.5)
    assert parse_scores("Assistant 1 did well.\n(8, 4)") == (8.0, 4.0)
    assert parse_scores("no numbers here") is None
    assert parse_grade("0.5") == 0.5 and parse_grade("1.0\n") == 1.0 and parse_grade("0.7.") == 0.7
    assert parse_grade("Correct") is None and parse_grade("5") is None


def _llava_bench_files(tmp_path: Path) -> tuple[list[dict], Path]:
    questions = [
        {"question_id": i, "image": f"{i % 2}.jpg", "text": f"Question {i}?", "category": c}
        for i, c in enumerate(["conv", "detail", "complex", "conv"])
    ]
    (tmp_path / "context.jsonl").write_text(
        json.dumps({"image": "0.jpg", "caption": ["A dog.", "On grass."]})
        + "\n"
        + json.dumps({"image": "1.jpg", "caption": "A cat."})
        + "\n"
    )
    (tmp_path / "answers_gpt4.jsonl").write_text(
        "".join(json.dumps({"question_id": i, "text": f"reference {i}"}) + "\n" for i in range(4))
    )
    return questions, tmp_path


def test_llava_bench_relative_scores_and_failures(fake_judge, tmp_path: Path) -> None:
    questions, folder = _llava_bench_files(tmp_path)
    reviews = {
        "model 0": (200, "8 6\nfine"),
        "model 1": (200, "7, 7\nsame"),
        "model 2": (200, "(9, 6)"),
        "model 3": (500, "down"),
    }
    judge = fake_judge(lambda req: next(v for k, v in reviews.items() if k in _user(req)))
    answers = [{"question_id": i, "text": f"model {i}"} for i in range(4)]
    res = score("llava-bench-in-the-wild", questions, answers, folder, judge.client(max_retries=1))
    b = res["breakdown"]
    assert b["conv"]["relative_score"] == pytest.approx(75.0)
    assert b["detail"]["relative_score"] == pytest.approx(100.0)
    assert b["complex"]["relative_score"] == pytest.approx(100 * 6 / 9)
    assert res["score"] == pytest.approx(100 * 6.333 / 8.0)  # means rounded to 3 decimals first, as LLaVA
    assert b["all"]["reference_score"] == pytest.approx(80.0)
    assert res["counts"]["judge_failures"] == 1 and res["counts"]["judged"] == 3
    assert any("HTTP 500" in w for w in res["warnings"])
    first = next(r for r in judge.requests if "model 0" in _user(r))
    assert first["temperature"] == 0.2 and first["max_tokens"] == 1024
    assert first["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    expected = review_content("A dog.\nOn grass.", "Question 0?", "reference 0", "model 0", RULE_PROMPT)
    assert _user(first) == expected
    assert _user(first).startswith("[Context]\nA dog.\nOn grass.\n\n[Question]\nQuestion 0?\n\n[Assistant 1]\n")


def test_mmvet_scores_capabilities_with_official_retry(fake_judge, tmp_path: Path) -> None:
    meta = {
        "v1_0": {"imagename": "0.png", "capability": ["rec", "ocr"], "question": "Q0?", "answer": "a<AND>b"},
        "v1_1": {"imagename": "1.png", "capability": ["ocr"], "question": "Q1?", "answer": "c"},
        "v1_2": {"imagename": "2.png", "capability": ["know", "rec"], "question": "Q2?", "answer": "d<OR>e"},
        "v1_3": {"imagename": "3.png", "capability": ["ocr"], "question": "Q3?", "answer": "f"},
    }
    (tmp_path / "mm-vet.json").write_text(json.dumps(meta))

    def grade(req: dict) -> Reply:
        text = _user(req)
        if "| pred0 |" in text:
            return 200, "1.0"
        if "| pred1 |" in text:
            return 200, "0.5 "
        return (200, "0.0") if text.endswith(RETRY_SUFFIX) else (200, "Correct")

    judge = fake_judge(grade)
    questions = [{"question_id": i, "image": f"{i}.png", "text": f"Q{i}?"} for i in range(4)]
    answers = [{"question_id": i, "text": f"pred{i}"} for i in range(3)]  # 3 has no answer: 0
    res = score("mm-vet", questions, answers, tmp_path, judge.client())
    assert res["score"] == pytest.approx(100 * 1.5 / 4)
    assert res["breakdown"]["capability"] == {"ocr": pytest.approx(50.0), "rec": 50.0, "know": 0.0}
    assert res["breakdown"]["capability_integration"] == {"ocr": 25.0, "know_rec": 0.0, "ocr_rec": 100.0}
    assert res["counts"]["unparsed"] == 0 and res["counts"]["missing"] == 1
    first = next(r for r in judge.requests if "| pred0 |" in _user(r))
    assert _user(first) == grader_message("Q0?", "a<AND>b", "pred0")
    assert _user(first).endswith("\nQ0? | a <AND> b | pred0 | ")
    assert (first["temperature"], first["max_tokens"]) == (0.0, 3)
    retries = [r["temperature"] for r in judge.requests if "| pred2 |" in _user(r)]
    assert retries == [0.0, 0.0]  # the first re-ask, at temperature 0, parses


def test_mmvet_unparsable_after_five_replies_scores_zero(fake_judge, tmp_path: Path) -> None:
    (tmp_path / "mm-vet.json").write_text(
        json.dumps({"v1_0": {"capability": ["rec"], "question": "Q?", "answer": "a"}})
    )
    judge = fake_judge(lambda req: (200, "Correct"))
    res = score(
        "mmvet",
        [{"question_id": 0, "text": "Q?"}],
        [{"question_id": 0, "text": "a"}],
        tmp_path / "mm-vet.json",
        judge.client(),
    )
    assert res["score"] == 0.0 and res["counts"]["unparsed"] == 1
    assert [r["temperature"] for r in judge.requests] == [0.0, 0.0, 0.5, 1.0, 1.5]


def test_cli_with_judge_never_prints_the_key(fake_judge, tmp_path: Path, capsys) -> None:
    questions, folder = _llava_bench_files(tmp_path)
    judge = fake_judge(lambda req: (200, "8 8\nequal"))
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    afile = tmp_path / "answers.jsonl"
    afile.write_text("".join(json.dumps({"question_id": i, "text": "ok"}) + "\n" for i in range(4)))
    argv = [
        "--benchmark",
        "llava_bench",
        "--questions",
        str(qfile),
        "--answers",
        str(afile),
        "--annotations",
        str(folder),
        "--judge-base-url",
        judge.base_url,
        "--judge-model",
        "m",
        "--judge-api-key-env",
        "FAKE_JUDGE_KEY",
        "--json",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["score"] == pytest.approx(100.0)
    assert SECRET not in out.out + out.err
    assert main(argv[:6] + ["--annotations", str(folder)]) == 2
    assert "needs an LLM judge" in capsys.readouterr().err


def test_a_judge_failing_every_request_is_an_error(fake_judge, tmp_path: Path) -> None:
    questions, folder = _llava_bench_files(tmp_path)
    judge = fake_judge(lambda req: (401, "invalid key"))
    answers = [{"question_id": i, "text": "ok"} for i in range(4)]
    with pytest.raises(ScoringError, match="every one of the 4 judge requests failed; first: .*HTTP 401") as err:
        score("llava_bench", questions, answers, folder, judge.client())
    assert SECRET not in str(err.value)
