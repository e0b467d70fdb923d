"""The label-free calibration sweep's parts: the retention budget, the search space, the calibration set, the
hidden-state similarity, the report, and the configs that reach them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from lvpruning.policies import AT_TOWER, POLICIES, get_policy
from pipelines.config import Calibration, load_config
from pipelines.eval.evaluation import make_settings
from pipelines.eval.models import ModelSpec, Setting, left_padded, load_model
from pipelines.job import resolve
from pipelines.sweep.calibration import (
    CalibrationSpace,
    budget_ratios,
    calibration_report,
    calibration_requests,
    check_calibration,
    hidden_similarity,
    retention,
    spearman,
    trial_setting,
)
from pipelines.sweep.space import baseline_trials, trial_job
from tests.bad_bytes import not_utf8

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_retention_and_the_solved_last_ratio_by_hand():
    # VScan's 7B setting: 96 tokens through layers 0-15, 32 through 16-31: 64 of 576 on average
    assert retention((-1, 15), (96 / 576, 32 / 576), 32) == pytest.approx(64 / 576)
    # LVPruning on the toy decoder: layer 0 sees all, then 0.5, 0.25, 0.125
    assert retention((0, 1, 2), (0.5, 0.25, 0.125), 4) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 4)
    # VFlowOpt's published LLaVA-OV 10% row, rescaled to Vicuna's 32 layers (9 + 9 + 14): r_2 = 0.6011 * 0.11662
    target = (9 * 0.11662 + 9 * 0.11662 + 14 * 0.11662 * 0.6011) / 32
    ratios = budget_ratios((-1, 8, 17), (0.11662, 0.11662), target, 32, 1e-6)
    assert ratios[-1] == pytest.approx(0.11662 * 0.6011, abs=1e-6)
    assert budget_ratios((-1,), (), 0.33, 4, 1 / 64) == (0.328125,)
    assert budget_ratios((0, 1), (0.25,), 0.9, 4, 1 / 64) == (0.25, 0.25)  # out of reach: capped, reported


@pytest.mark.parametrize("method, layers", [("vflowopt", (-1, 0, 1)), ("vscan", (-1, 1)), ("lvpruning", (0, 1, 2))])
def test_every_suggestion_meets_the_budget_within_one_step(method, layers):
    params = {"t": (0.0, 50.0)} if method == "vflowopt" else {}
    c = Calibration(method=method, budget=0.45, params=params, ratio_range=(0.1, 1.0))  # the range allows misses
    space = CalibrationSpace(c, layers, 4)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for i in range(100):
        trial = study.ask()
        out = space(trial)
        study.tell(trial, float(i % 5))
        ratios = out["ratios"]
        assert all(b <= a for a, b in zip(ratios, ratios[1:])) and all(0 < r <= 1 for r in ratios)
        assert all(abs(r * 64 - round(r * 64)) < 1e-6 for r in ratios)  # on the 1/64 grid
        assert abs(retention(layers, ratios, 4) - 0.45) <= (1 / 64) / 2 + 1e-9
        if method == "vflowopt":
            assert 0.0 <= trial.params["t"] <= 50.0


def test_spearman_and_the_report_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks, then Pearson's r on the ranks
    x, y = [1, 2, 3, 3], [1, 3, 2, 4]
    rx, ry = [0, 1, 2.5, 2.5], [0, 2, 1, 3]
    mx, my = sum(rx) / 4, sum(ry) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expected = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman(x, y) == pytest.approx(expected)
    rows = [
        {"hidden_similarity": 0.9, "accuracy/mean": 80.0, "retention": 0.3, "tflops": 1e-4, "config": "a"},
        {"hidden_similarity": 0.95, "accuracy/mean": 85.0, "retention": 0.3, "tflops": 1e-4, "config": "b"},
        {"hidden_similarity": 0.8, "accuracy/mean": 88.0, "retention": 0.3, "tflops": 1e-4, "config": "c"},
    ]
    table, metrics = calibration_report(rows)
    assert table.splitlines()[1].endswith("b")  # best similarity first
    assert metrics["calibration/chosen_accuracy"] == 85.0 and metrics["calibration/best_accuracy"] == 88.0
    assert metrics["calibration/accuracy_gap"] == pytest.approx(3.0)
    assert metrics["calibration/spearman"] == pytest.approx(-0.5)


def write_conversations(world, path: Path) -> None:
    """Training conversations over the tiny world's images: one without an image, one with a missing image."""
    records = [
        {"id": str(r["question_id"]), "image": r["image"], "conversations": [{"from": "human", "value": r["text"]}]}
        for r in world.records()[: world.n_good]
    ]
    records.insert(1, {"id": "text-only", "conversations": [{"from": "human", "value": "hello"}]})
    records.insert(3, {"id": "gone", "image": "img/missing.png", "conversations": [{"from": "human", "value": "x"}]})
    path.write_text(json.dumps(records))


def test_calibration_set_skips_and_counts_unusable_records(world, tmp_path):
    write_conversations(world, tmp_path / "train.json")
    processor = AutoProcessor.from_pretrained(world.model)
    c = Calibration(num_questions=50, seed=3)  # more than there are: every record is read
    prompts, images, skipped = calibration_requests(str(tmp_path / "train.json"), str(world.images), processor, c)
    assert len(prompts) == world.n_good and len(images["pixel_values"]) == world.n_good and skipped == 2
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert all(int((p == image_id).sum()) == 64 for p in prompts)
    again, _, _ = calibration_requests(str(tmp_path / "train.json"), str(world.images), processor, c)
    assert all(np.array_equal(a, b) for a, b in zip(prompts, again))  # the same sample for the same seed


def test_calibration_set_skips_and_counts_a_line_that_is_not_utf8(world, tmp_path):
    write_conversations(world, tmp_path / "train.json")
    lines = [json.dumps(r).encode() for r in json.loads((tmp_path / "train.json").read_text())]
    lines.insert(2, not_utf8(0))
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    processor = AutoProcessor.from_pretrained(world.model)
    c = Calibration(num_questions=50, seed=3)
    prompts, _, skipped = calibration_requests(str(tmp_path / "train.jsonl"), str(world.images), processor, c)
    assert len(prompts) == world.n_good and skipped == 3  # the text-only record, the missing image, the bad bytes


@pytest.mark.parametrize("setting", [Setting("vscan", (0.5, 0.25), layers=(-1, 1)), Setting("lvpruning", (0.5, 0.25))])
def test_hidden_similarity_against_a_sample_by_sample_reference(world, tmp_path, setting):
    """The batched, padded similarity equals, question by question and unpadded: HF's own final hidden state
    (``output_hidden_states``) against the one the pruned logits come from."""
    write_conversations(world, tmp_path / "train.json")
    processor = AutoProcessor.from_pretrained(world.model)
    c = Calibration(num_questions=6)
    prompts, images, _ = calibration_requests(str(tmp_path / "train.json"), str(world.images), processor, c)
    spec = ModelSpec(str(world.model), str(world.modules))
    pad = processor.tokenizer.pad_token_id
    value = hidden_similarity(spec, setting, prompts, images, pad, batch_size=4)
    model = load_model(spec, setting.method)
    policy = get_policy(setting.method, decision_modules=model.decision_modules)
    expected = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images["pixel_values"]):
            ids = torch.from_numpy(np.asarray(prompt))[None]
            image = torch.from_numpy(image)[None]
            full = model.model(input_ids=ids, pixel_values=image, output_hidden_states=True).hidden_states[-1][0, -1]
            prune = {"keep_ratios": setting.keep_ratios, "policy": policy, "layers": setting.layers}
            out = model(input_ids=ids, pixel_values=image, **prune)
            assert torch.allclose(model.model.lm_head(out.last_hidden_state[0, -1]), out.logits[0, -1], atol=1e-5)
            expected.append(F.cosine_similarity(full, out.last_hidden_state[0, -1], dim=0).item())
    assert value == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert value < 1.0
    keep_all = Setting(setting.method, (1.0, 1.0), layers=setting.layers)
    assert hidden_similarity(spec, keep_all, prompts, images, pad, batch_size=4) == pytest.approx(1.0, abs=1e-5)


def test_left_padding_puts_every_prompt_at_the_end():
    ids, mask = left_padded([np.array([5, 6]), np.array([7, 8, 9])], pad_token_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def with_calibration(cfg, calibration: Calibration):
    return cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"calibration": calibration})})


def test_calibration_configs_fail_early_and_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="calibration.method"):
        load_config(None, ["sweep.calibration.method=nope"])
    with pytest.raises(ValueError, match="has no parameters"):
        load_config(None, ["sweep.calibration.params={gamma: [0, 1]}"])
    with pytest.raises(ValueError, match="is empty"):
        load_config(None, ["sweep.calibration.params={t: [5, 1]}"])
    cfg = load_config(None, ["sweep.objective=hidden_similarity", "sweep.calibration.method=lvpruning"])
    with pytest.raises(ValueError, match="eval.modules"):
        check_calibration(cfg, 4)
    cfg = with_calibration(load_config(None, []), Calibration(method="fastv", budget=0.2))
    with pytest.raises(ValueError, match="below what layers"):  # FastV after layer 0 of 4 keeps layer 0 whole
        check_calibration(cfg, 4)


def test_a_calibration_trial_evaluates_its_own_setting():
    params = {"method": "vflowopt", "layers": [-1, 0, 1], "ratios": [0.5, 0.4, 0.2], "t": 3.0, "alpha": 0.5}
    calibration = Calibration(params={"t": (0.0, 9.0), "alpha": (-1.0, 1.0)})
    cfg = with_calibration(load_config(None, ["sweep.objective=hidden_similarity"]), calibration)
    setting, evaluated = trial_setting(resolve(cfg), params)
    ev = evaluated.config.eval
    assert setting.name == "vflowopt_L-1-0-1_0.5-0.4-0.2_alpha=0.5_t=3"
    assert make_settings(ev.methods, ev.schedules, 0, ev.at_own_layers) == [setting]


def test_tower_methods_run_at_their_own_layers_from_yaml():
    with pytest.raises(ValueError, match="at_own_layers"):
        load_config(None, ["eval.methods=[none, visionzip]"])
    own = "{method: vscan, layers: [-1, 1], schedules: [[0.5, 0.25], [0.25, 0.1]]}"
    cfg = load_config(None, [f"eval.at_own_layers=[{own}]", f"sweep.baselines.at_own_layers=[{own}]"])
    settings = make_settings(cfg.eval.methods, cfg.eval.schedules, 0, cfg.eval.at_own_layers)
    assert [s.name for s in settings[-2:]] == ["vscan_L-1-1_0.5-0.25", "vscan_L-1-1_0.25-0.1"]
    trial = baseline_trials(cfg)[-1]
    assert trial["method"] == "vscan" and trial["layers"] == [-1, 1]
    evaluated = trial_job(resolve(cfg), trial, "abc").config.eval
    assert evaluated.methods == () and evaluated.at_own_layers[0].schedules == ((0.5, 0.25), (0.25, 0.1))
    with pytest.raises(ValueError, match="pruning layers"):
        load_config(None, ["eval.at_own_layers=[{method: vscan, layers: [1, -1], schedules: [[0.5, 0.25]]}]"])
    assert not set(POLICIES) - {"lvpruning"} - set(cfg.sweep.baselines.methods) - set(AT_TOWER)
