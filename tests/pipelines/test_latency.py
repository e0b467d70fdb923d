"""Latency: every setting timed in one process, interleaved, warm-up left out; median and IQR per setting."""

from __future__ import annotations

import itertools

import pytest
from transformers import AutoProcessor

import pipelines.eval.latency as latency
from lvpruning.checkpoint import read_pruning_config
from pipelines.eval.latency import LatencyOptions, latency_requests, measure_latency, summarize, time_settings
from pipelines.eval.models import ModelSpec, Setting
from tests.pipelines.test_inference import RATIOS, TinyWorld

pytestmark = pytest.mark.usefixtures("local_ray")


SETTINGS = [Setting("none"), Setting("lvpruning", RATIOS), Setting("random", RATIOS, seed=3)]


def spec(world: TinyWorld) -> ModelSpec:
    return ModelSpec(str(world.model), str(world.modules), read_pruning_config(world.modules))


def test_summarize_by_hand():
    # exclusive quartiles of 1..8: positions 9/4 and 27/4 -> 2.25 and 6.75
    assert summarize([8, 1, 7, 2, 6, 3, 5, 4]) == (4.5, 4.5)
    assert summarize([3.0]) == (3.0, 0.0)


def test_settings_are_interleaved_rotated_and_warmup_is_left_out(world, monkeypatch):
    calls, clock = [], itertools.count(1)

    def fake(model, tokenizer, prompts, pixel_values, setting, policy, max_new_tokens, prefill=None):
        calls.append(setting.name)
        t = float(next(clock))
        return [""] * len(prompts), t, 10 * t

    monkeypatch.setattr(latency, "timed_generate", fake)
    processor = AutoProcessor.from_pretrained(world.model)
    options = LatencyOptions(batch_size=2, warmup=1, repeats=3)
    requests = latency_requests("toy", str(world.questions), str(world.images), processor, options)
    out = time_settings(spec(world), SETTINGS, requests, processor.tokenizer, options)
    n, lv, r = (s.name for s in SETTINGS)
    assert calls == [n, lv, r, lv, r, n, r, n, lv, n, lv, r]  # 4 rounds, each starting one setting later
    # recorded: rounds 1-3 only; "none" ran at calls 6, 8, 10 -> times 6, 8, 10
    assert out[n] == {
        "latency/prefill_ms": 8.0,
        "latency/prefill_ms_iqr": pytest.approx(4.0),  # exclusive quartiles of (6, 9, 10): 6 and 10
        "latency/e2e_ms": 80.0,
        "latency/e2e_ms_iqr": pytest.approx(40.0),
    }
    assert out[lv]["latency/prefill_ms"] == 9.0 and out[r]["latency/prefill_ms"] == 7.0  # (4, 9, 11), (5, 7, 12)


def test_requests_skip_unusable_images_and_repeat_when_too_few(world, tmp_path):
    processor = AutoProcessor.from_pretrained(world.model)
    every = LatencyOptions(batch_size=world.n_good + 3)
    requests = latency_requests("toy", str(world.questions), str(world.images), processor, every)
    prompts, pixels = requests["input_ids"], requests["pixel_values"]
    assert list(requests) == ["input_ids", "pixel_values"] and len(prompts) == len(pixels) == world.n_good + 3
    good = {r["question_id"] for r in world.records()[: world.n_good]}
    assert len(good) == world.n_good  # the missing and corrupt images (the last two) are not timed
    for i in range(3):  # the batch is filled by repeating the first usable requests
        assert (prompts[world.n_good + i] == prompts[i]).all() and (pixels[world.n_good + i] == pixels[i]).all()
    assert len({p.tobytes() for p in pixels}) == world.n_good
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in world.questions.read_text().splitlines()[world.n_good :]))
    with pytest.raises(ValueError, match="no question with a usable image"):
        latency_requests("toy", str(bad), str(world.images), processor, every)


def test_measured_in_one_ray_task(world):
    options = LatencyOptions(batch_size=2, warmup=1, repeats=3, max_new_tokens=3)
    out = measure_latency(spec(world), SETTINGS, "toy", str(world.questions), str(world.images), options)
    assert set(out) == {s.name for s in SETTINGS}
    for metrics in out.values():
        assert 0 < metrics["latency/prefill_ms"] <= metrics["latency/e2e_ms"]
        assert metrics["latency/prefill_ms_iqr"] >= 0 and metrics["latency/e2e_ms_iqr"] >= 0
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure_latency(
            spec(world), SETTINGS, "toy", str(world.questions), str(world.images), LatencyOptions(repeats=0)
        )
