"""``python -m pipelines.eval.score``: end to end on LLaVA-1.5-13B's released answers, and its error messages."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.eval.score import main
from pipelines.eval.scoring.common import ScoringError, read_json, read_tsv
from tests.bad_bytes import SEEDS, not_utf8, not_utf8_problem

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
    name, headline, *_, low, _, high = lines[1].split()
    assert (name, headline) == ("img_accuracy", "71.64")
    assert any(line.split() == ["counts/questions", "4241"] for line in lines)
    # The bootstrap interval against Wilson's score interval for 71.64% of the 2,017 questions with an image
    n, p, z = 2017, 0.7164, 1.959964
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n),
    )
    assert float(low) == pytest.approx(100 * (centre - half), abs=0.3)
    assert float(high.rstrip(")")) == pytest.approx(100 * (centre + half), abs=0.3)


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


@pytest.mark.parametrize("seed", SEEDS)
def test_cli_names_the_line_that_is_not_utf8(tmp_path: Path, capsys, seed: int) -> None:
    """An answer line of such bytes is malformed (counted, the rest scored); a question or label line, an error."""
    bad = not_utf8(seed)
    argv = _pope_inputs(tmp_path, ['{"question_id": 0, "text": "Yes"}', "", '{"question_id": 1, "text": "No"}'])
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(answers.read_bytes().replace(b"\n\n", b"\n" + bad + b"\n"))
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["counts"] == {"questions": 2, "answered": 2, "missing": 0, "malformed_lines": 1}
    assert f"{answers}:2: malformed answer line: {not_utf8_problem(bad)}" in out.err
    answers.write_text('{"question_id": 0, "text": "Yes"}\n')
    for name, what in (("q.jsonl", "questions"), ("coco_pope_random.json", "POPE label")):
        path = tmp_path / name
        path.write_bytes(path.read_bytes() + bad + b"\n")
        assert main(argv) == 2
        assert f"error: {path}:3: {what} line is {not_utf8_problem(bad)}\n" in capsys.readouterr().err
        path.write_bytes(path.read_bytes()[: -len(bad) - 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_whole_files_that_are_not_utf8_name_the_line(tmp_path: Path, seed: int) -> None:
    bad = not_utf8(seed)
    annotations = tmp_path / "ann.json"
    annotations.write_bytes(b'{"questions": [\n  "' + bad + b'"\n]}\n')
    with pytest.raises(ScoringError, match=rf"^{re.escape(str(annotations))}:2: GQA questions file is not UTF-8 text"):
        read_json(annotations, "GQA questions")
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_bytes(b"index\tquestion\n0\twhat ?\n1\t" + bad + b"\n")
    with pytest.raises(ScoringError, match=rf"^{re.escape(str(tsv))}:3: MMBench tsv file is not UTF-8 text"):
        read_tsv(tsv, "MMBench tsv")
