"""Evaluating a setting: the toy scorer, TFLOPs, the config plumbing, and one MLflow run per setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lvpruning import PruningConfig
from lvpruning.checkpoint import read_pruning_config
from lvpruning.flops import analytic_flops
from lvpruning.presets import llava_15_7b_config
from lvpruning.tiny import tiny_llava_config
from pipelines.config import load_config
from pipelines.eval.evaluation import (
    Benchmark,
    benchmarks_from_config,
    format_table,
    make_settings,
    run_setting,
    setting_tflops,
)
from pipelines.eval.models import ModelSpec, Setting
from pipelines.eval.scoring import ScoringError, score
from pipelines.eval.scoring.intervals import interval, mean_replicates
from pipelines.tracking import redact, ui_hint
from tests.pipelines.test_inference import OPTIONS, RATIOS, direct_answers

pytestmark = pytest.mark.usefixtures("local_ray")


def test_toy_scorer_exact_match_per_category(tmp_path):
    questions = [{"question_id": i, "text": "q", "category": c} for i, c in enumerate(["color", "color", "shape"])]
    truth = tmp_path / "truth.jsonl"
    truth.write_text(
        "".join(json.dumps({"question_id": i, "answer": a}) + "\n" for i, a in enumerate("red blue x".split()))
    )
    answers = [{"question_id": 0, "text": " Red."}, {"question_id": 1, "text": "green"}]  # 2 has no answer
    res = score("Toy", questions, answers, truth)
    assert res["score"] == pytest.approx(100 / 3)
    assert res["breakdown"]["category"] == {"color": 50.0, "shape": 0.0}
    assert res["counts"]["missing"] == 1
    with pytest.raises(ScoringError, match="ground_truth.jsonl"):
        score("toy", questions, answers)


def test_tflops_follow_the_flops_api():
    config, pruning = tiny_llava_config(), PruningConfig(layers=(0, 1), train_ratios=RATIOS, infer_ratios=RATIOS)
    report = analytic_flops(config, pruning, RATIOS, num_text_tokens=30)
    assert setting_tflops(config, None, Setting("none")) == pytest.approx(report.baseline / 1e12)
    assert setting_tflops(config, pruning, Setting("lvpruning", RATIOS)) == pytest.approx(report.pruned / 1e12)
    without = report.pruned_without_decision / 1e12
    assert setting_tflops(config, pruning, Setting("random", RATIOS)) == pytest.approx(without)  # no overhead
    fastv = analytic_flops(config, pruning, RATIOS, num_text_tokens=30, method="fastv")
    assert fastv.pruned > without * 1e12  # its recomputed attention row is counted
    assert setting_tflops(config, pruning, Setting("fastv", RATIOS)) == pytest.approx(fastv.pruned / 1e12)


def test_a_setting_at_its_own_layers():
    """A training-free method at its published 7B layers, not the decision modules': counted there, named apart."""
    config, pruning = llava_15_7b_config(), PruningConfig()  # decision modules after 1, 8, 16
    setting = Setting("transprune", (0.875, 0.625, 0.125), layers=(6, 8, 11))
    assert setting.name == "transprune_L6-8-11_0.875-0.625-0.125" and setting.metadata()["layers"] == [6, 8, 11]
    report = analytic_flops(config, pruning, setting.keep_ratios, 30, method="transprune", layers=(6, 8, 11))
    assert report.tokens_per_layer[6:8] == (606, 534)  # 576 + 30 tokens up to layer 6, 504 + 30 after it
    assert setting_tflops(config, pruning, setting) == pytest.approx(report.pruned / 1e12)
    assert setting_tflops(config, pruning, setting) == pytest.approx(3.9986, abs=1e-4)  # docs/methods.md
    with pytest.raises(ValueError, match="one keep ratio each"):
        Setting("fastv", (0.5,), layers=(1, 2))


def test_settings_config_and_redaction(tmp_path):
    settings = make_settings(("none", "lvpruning", "fastv"), [(0.5, 0.3), (0.3, 0.1)], seed=1)
    assert [s.name for s in settings] == [
        "none",
        "lvpruning_0.5-0.3",
        "lvpruning_0.3-0.1",
        "fastv_0.5-0.3",
        "fastv_0.3-0.1",
    ]
    assert redact({"uri": ["https://me:secret@mlflow.example.com/x"]}) == {"uri": ["https://mlflow.example.com/x"]}
    links = ui_hint("https://me:secret@mlflow.example.com/", "7", "abc")
    assert "secret" not in links and links.splitlines()[-1].strip() == (
        "run: https://mlflow.example.com/#/experiments/7/runs/abc?workflowType=machine_learning"
    )

    config = load_config(None, ["eval.benchmarks=[toy,gqa]", f"eval.toy_world={tmp_path}"])
    with pytest.raises(ValueError, match=r"eval.data has no files for benchmarks \['gqa'\]"):
        benchmarks_from_config(config)
    config = load_config(None, ["eval.benchmarks=[pope,toy]", f"eval.toy_world={tmp_path}"])
    pope, toy = benchmarks_from_config(config)
    assert toy.annotations == str(tmp_path / "test" / "ground_truth.jsonl") and pope.annotations.endswith("pope")
    with pytest.raises(ValueError, match="eval.methods"):
        load_config(None, ["eval.methods=[none,oracle]"])


@pytest.mark.timeout(300)
def test_run_setting_logs_one_run_with_params_and_metrics(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store keeps artifacts in ./mlruns
    # Ground truth = what the model answers for the color questions, something else for the shape ones.
    setting = Setting("lvpruning", RATIOS)
    said = direct_answers(world, setting, world.records()[: world.n_good])
    truth = tmp_path / "truth.jsonl"
    lines = [{"question_id": r["question_id"], "category": r["category"], "answer": "?"} for r in world.records()]
    for line in lines[: world.n_good]:
        if line["category"] == "color":
            line["answer"] = said[line["question_id"]]
    truth.write_text("".join(json.dumps(line) + "\n" for line in lines))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = ModelSpec(str(world.model), str(world.modules), read_pruning_config(world.modules))
    bench = Benchmark("toy", str(world.questions), str(world.images), str(truth))
    config = {"mlflow": {"tracking_uri": "https://me:secret@mlflow.example.com"}}
    latency = {"latency/prefill_ms": 3.5, "latency/prefill_ms_iqr": 0.25, "latency/e2e_ms": 9.0}
    result = run_setting(
        spec, setting, [bench], tmp_path / "eval", OPTIONS, experiment="t", uri=uri, config=config, latency=latency
    )

    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lvpruning_0.5-0.25"
    params = run.data.params
    assert params["method"] == "lvpruning" and json.loads(params["infer_ratios"]) == list(RATIOS)
    assert json.loads(params["layers"]) == [0, 1] and json.loads(params["train_ratios"]) == list(RATIOS)
    metrics = run.data.metrics
    n_color = world.n_good // 2
    assert metrics["accuracy/toy"] == pytest.approx(100 * n_color / (world.n_good + 2))
    assert metrics["accuracy/toy/color"] == pytest.approx(100 * n_color / (n_color + 2))  # +2 unanswered
    assert metrics["accuracy/toy/shape"] == 0.0 and metrics["unanswered/toy"] == 2
    assert metrics["accuracy/mean"] == metrics["accuracy/toy"]
    hits = [1] * n_color + [0] * (world.n_good + 2 - n_color)  # the toy scorer's questions, resampled alike
    for name in ("accuracy/toy", "accuracy/mean"):
        expected = interval(mean_replicates(hits, "toy"))
        assert (metrics[f"ci_low/{name}"], metrics[f"ci_high/{name}"]) == pytest.approx(expected)
    assert metrics["tflops"] == pytest.approx(setting_tflops(tiny_llava_config(), spec.pruning, setting))
    assert {k: metrics[k] for k in latency} == latency  # pipelines.eval.latency's, logged as they are
    logged = Path(MlflowClient(uri).download_artifacts(result.run_id, "config.json", str(tmp_path)))
    assert "secret" not in logged.read_text() and "mlflow.example.com" in logged.read_text()
    assert (tmp_path / "eval" / "lvpruning_0.5-0.25" / "toy.jsonl").is_file()
    table = format_table([result])
    assert "lvpruning" in table and "0.5-0.25" in table
    per_type = table.splitlines()[-1]  # the question types' line: accuracies only
    assert per_type.startswith("lvpruning_0.5-0.25: ") and f"toy/color {metrics['accuracy/toy/color']:.2f}" in per_type
    assert per_type.count(", ") == 1 and "curacy" not in per_type  # color and shape, no interval bounds
    assert f"{metrics['ci_low/accuracy/mean']:.2f}-{metrics['ci_high/accuracy/mean']:.2f}" in table
    scores = json.loads(
        Path(MlflowClient(uri).download_artifacts(result.run_id, "scores.json", str(tmp_path))).read_text()
    )
    assert scores["toy"]["interval"] == pytest.approx(expected) and "replicates" not in scores["toy"]


def test_a_failing_setting_ends_its_run_failed(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = ModelSpec(str(world.model))
    bench = Benchmark("toy", str(tmp_path / "no_such_questions.jsonl"), str(world.images), str(world.truth))
    with pytest.raises(FileNotFoundError):
        run_setting(spec, Setting("none"), [bench], tmp_path / "eval", OPTIONS, experiment="t", uri=uri)
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["method"] == "none"
