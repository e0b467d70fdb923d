"""``python -m pipelines.eval.score``: end to end on LLaVA-1.5-13B's released answers, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.eval.score import main

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "llava-v1.5-13b"


def fixture_dir(name: str) -> Path:
    folder = FIXTURES / name
    if not (folder / "answers.jsonl").is_file():
        pytest.skip(f"LLaVA-1.5-13B {name} fixtures not found at {folder.resolve()}")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.eval.score", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_pope_json_reproduces_published_f1() -> None:
    folder = fixture_dir("pope")
    proc = run_cli(
        "--benchmark",
        "pope",
        "--questions",
        str(folder / "llava_pope_test.jsonl"),
        "--answers",
        str(folder / "answers.jsonl"),
        "--annotations",
        str(folder),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["benchmark"] == "pope" and round(res["score"], 1) == 85.9


def test_cli_scienceqa_json_reproduces_published_img_accuracy() -> None:
    folder = fixture_dir("scienceqa")
    args = (
        "--benchmark",
        "ScienceQA-IMG",
        "--questions",
        str(folder / "llava_test_CQM-A.json"),
        "--answers",
        str(folder / "answers.jsonl"),
    )
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert round(json.loads(proc.stdout)["score"], 1) == 71.6


def test_cli_table(capsys) -> None:
    folder = fixture_dir("scienceqa")
    main(
        [
            "--benchmark",
            "scienceqa",
            "--questions",
            str(folder / "llava_test_CQM-A.json"),
            "--answers",
            str(folder / "answers.jsonl"),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "scienceqa"]
    assert lines[1].split() == ["img_accuracy", "71.64"]
    assert any(line.split() == ["counts/questions", "4241"] for line in lines)


def _pope_inputs(tmp_path: Path, answer_lines: list[str]) -> list[str]:
    q = tmp_path / "q.jsonl"
    q.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "a.jpg", "text": f"Is there a {i}?", "category": "random"}) + "\n"
            for i in range(2)
        )
    )
    (tmp_path / "coco_pope_random.json").write_text(
        "".join(
            json.dumps({"question_id": i, "image": "a.jpg", "text": f"Is there a {i}?", "label": "yes"}) + "\n"
            for i in range(2)
        )
    )
    a = tmp_path / "a.jsonl"
    a.write_text("".join(line + "\n" for line in answer_lines))
    return ["--benchmark", "pope", "--questions", str(q), "--answers", str(a), "--annotations", str(tmp_path)]


def test_cli_malformed_answer_lines_are_counted_and_reported(tmp_path: Path, capsys) -> None:
    lines = [
        '{"question_id": 0, "text": "Yes"}',
        '{"question_id": 1, "text": "No"}',
        '{"question_id": 1',
        "[1]",
    ]
    argv = _pope_inputs(tmp_path, lines)
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["counts"]["malformed_lines"] == 2
    assert f"{tmp_path / 'a.jsonl'}:3: malformed answer line: not valid JSON" in out.err
    assert f"{tmp_path / 'a.jsonl'}:4: malformed answer line: not a JSON object" in out.err


def test_cli_errors_name_file_and_line(tmp_path: Path, capsys) -> None:
    argv = _pope_inputs(tmp_path, ['{"question_id": 0, "text": "Yes"}', '{"question_id": 5, "text": "No"}'])
    assert main(argv) == 2
    assert f"error: {tmp_path / 'a.jsonl'}:2: answer for question_id 5, which is not in" in capsys.readouterr().err
    missing = str(tmp_path / "absent.jsonl")
    assert main([*argv[:4], "--answers", missing, *argv[6:]]) == 2
    assert f"answers file not found: {missing}" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text('{"question_id": 0}\nnot json\n')
    assert main(argv) == 2
    assert f"{tmp_path / 'q.jsonl'}:2: questions line is not valid JSON" in capsys.readouterr().err
    assert main(["--benchmark", "nobench", "--questions", "q", "--answers", "a"]) == 2
    assert "unknown benchmark 'nobench'" in capsys.readouterr().err
