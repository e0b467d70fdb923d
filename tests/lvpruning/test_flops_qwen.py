"""FLOPs of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: analytic = measured to the FLOP, on the 7B / 3B / 8B presets on
``meta`` and on tiny random models with real weights on the CPU (Qwen3-VL's DeepStack mergers included: they run);
the patch grid, the windows and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from lvpruning.config import PruningConfig
from lvpruning.flops import analytic_flops, dummy_inputs, image_layout, measure_flops
from lvpruning.flops_cli import main
from lvpruning.flops_qwen import window_lengths
from lvpruning.policies import POLICIES
from lvpruning.presets import PRESETS, load_llava_config
from lvpruning.tiny import tiny_qwen_vl_config

DEFAULT = PruningConfig()  # LVPruning at its default schedule


def test_presets_follow_the_published_configs():
    assert {"qwen2-vl-7b", "qwen2.5-vl-7b", "qwen2.5-vl-3b"} <= set(PRESETS)
    big, small, old = (load_llava_config(n) for n in ("qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen2-vl-7b"))
    t = big.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size) == (3584, 28, 4, 152064)
    t = small.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (2048, 36, 16, 151936)
    v = small.vision_config
    assert (v.hidden_size, v.intermediate_size, v.out_hidden_size, v.window_size) == (1280, 3420, 2048, 112)
    assert v.fullatt_block_indexes == [7, 15, 23, 31]
    assert (old.vision_config.embed_dim, old.vision_config.hidden_size) == (1280, 3584)
    assert big.image_token_id == 151655


def test_the_qwen3_vl_preset_follows_the_published_config():
    config = load_llava_config("qwen3-vl-8b")
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size) == (4096, 36, 12288, 151936)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 8, 128)
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["mrope_interleaved"]
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size) == (27, 1152, 4304, 16, 16)
    assert (v.out_hidden_size, v.num_position_embeddings, list(v.deepstack_visual_indexes)) == (4096, 2304, [8, 16, 24])
    layout = image_layout(config)  # 672 x 672: multiples of 32, a 42 x 42 patch grid
    assert (layout.image_size, layout.grid, layout.num_vision_tokens) == ((672, 672), (42, 42), 441)
    parts = analytic_flops(config, DEFAULT).baseline_parts
    assert parts["deepstack_mergers"] == 3 * parts["projector"]  # three mergers of the merger's shape


def test_patch_grid_is_smart_resize():
    config = load_llava_config("qwen2.5-vl-7b")
    layout = image_layout(config)  # 672 x 672 by default
    assert (layout.image_size, layout.grid, layout.num_tiles) == ((672, 672), (48, 48), 1)
    assert (layout.tile_tokens, layout.num_vision_tokens) == (2304, 576)
    layout = image_layout(config, (500, 800))  # rounded to multiples of 28: 504 x 812
    assert (layout.image_size, layout.grid, layout.num_vision_tokens) == ((504, 812), (36, 58), 522)
    inputs = dummy_inputs(config, 30, image_size=(500, 800))
    assert inputs["pixel_values"].shape == (36 * 58, 3 * 2 * 14 * 14) and inputs["input_ids"].shape == (1, 552)
    assert inputs["image_grid_thw"].device.type == "cpu" and inputs["image_grid_thw"].tolist() == [[1, 36, 58]]


@pytest.mark.parametrize("grid", [(48, 48), (36, 58), (14, 24), (2, 200)])
def test_windows_are_hf_windows(grid):
    config = load_llava_config("qwen2.5-vl-7b")
    v = config.vision_config
    _, cu = get_vision_window_index(torch.tensor([[1, *grid]]), v.spatial_merge_size, v.window_size, v.patch_size)
    assert window_lengths(config, *grid) == torch.diff(cu).tolist()
    assert window_lengths(config, 48, 48) == [64] * 36  # 4 x 4 merged cells = 8 x 8 patches each


@pytest.mark.parametrize("preset", ["qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen2-vl-7b", "qwen3-vl-8b"])
@pytest.mark.parametrize("size", [(672, 672), (500, 800)])
def test_presets_on_meta_without_weights(preset, size):
    config = load_llava_config(preset)
    report = analytic_flops(config, DEFAULT, image_size=size)
    assert measure_flops(config, image_size=size) == report.baseline
    assert measure_flops(config, DEFAULT, image_size=size) == report.pruned


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("size", [(56, 56), (60, 100)])  # 14 x 14 patches (partial windows), 16 x 24
def test_tiny_models_with_real_weights_on_cpu(family, size):
    config = tiny_qwen_vl_config(family, vision_layers=3)  # Qwen3-VL: three DeepStack mergers
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.7, 0.35, 0.1), infer_ratios=(0.7, 0.35, 0.1))
    report = analytic_flops(config, pruning, num_text_tokens=9, image_size=size)
    assert measure_flops(config, None, None, 9, device="cpu", image_size=size) == report.baseline
    assert measure_flops(config, pruning, None, 9, device="cpu", image_size=size) == report.pruned
    assert measure_flops(config, pruning, None, 9, device="meta", image_size=size) == report.pruned


def test_cli_json_and_table(capsys, tmp_path):
    tiny_qwen_vl_config("qwen2_5_vl").save_pretrained(tmp_path)
    argv = ["--model", str(tmp_path), "--layers", "0", "2", "--ratios", "0.5", "0.25", "--image-size", "60", "100"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_size"] == [64, 96] and out["num_vision_tokens"] == 96
    assert out["agreement"]["baseline"] == 0 and out["agreement"]["pruned"] == 0
    assert main(["--model", "qwen2.5-vl-3b", "--no-measure"]) == 0
    assert "1 image of 672 x 672 (1 tile, 576 vision tokens)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "size, message",
    [(["0", "672"], "two positive integers"), (["28", "6000"], "aspect ratio must be smaller than 200")],
)
def test_cli_rejects_a_bad_image_size(size, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "qwen2.5-vl-7b", "--image-size", *size, "--no-measure"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_tower_stage_refused_only_where_it_is_not_ported():
    config = load_llava_config("qwen2.5-vl-7b")
    with pytest.raises(ValueError, match="vflowopt's vision-tower stage .* not ported to Qwen-VL"):
        analytic_flops(config, DEFAULT, (0.5, 0.5, 0.3), method="vflowopt", layers=(-1, 8, 17))
    report = analytic_flops(config, DEFAULT, (0.5,), method="random", layers=(-1,))  # reads nothing of it
    assert report.tokens_per_layer == (288 + 30,) * 28
    report = analytic_flops(config, DEFAULT, (0.1,), method="visionzip", layers=(-1,))
    assert report.tokens_per_layer == (57 + 30,) * 28 and report.pruned_parts["policy"] > 0


TOWER_METHODS = [m for m in POLICIES if POLICIES[m].tower_merged]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("method", TOWER_METHODS)
@pytest.mark.parametrize("size, ratios", [((56, 56), (0.4, 0.2)), ((60, 100), (0.25, 0.1)), ((56, 56), (1.0, 0.5))])
def test_tower_methods_analytic_matches_measured(family, method, size, ratios):
    config = tiny_qwen_vl_config(family, num_layers=5, vision_layers=3)
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.7, 0.35, 0.1), infer_ratios=(0.7, 0.35, 0.1))
    layers = POLICIES[method].published.on(5).layers
    ratios = ratios[: len(layers)]
    report = analytic_flops(config, pruning, ratios, 12, method=method, layers=layers, image_size=size)
    assert (report.decision_per_stage[0] > 0) == (ratios[0] < 1)
    for device in ("cpu", "meta"):
        measured = measure_flops(
            config, pruning, ratios, 12, device=device, method=method, layers=layers, image_size=size
        )
        assert measured == report.pruned, device


@pytest.mark.parametrize("preset", ["qwen2.5-vl-7b", "qwen2-vl-7b"])
@pytest.mark.parametrize("method", TOWER_METHODS)
def test_tower_methods_on_the_presets_on_meta(preset, method):
    config = load_llava_config(preset)
    layers = POLICIES[method].published.on(config.text_config.num_hidden_layers).layers
    ratios = POLICIES[method].published.ratios
    report = analytic_flops(config, DEFAULT, ratios, method=method, layers=layers, image_size=(448, 448))
    assert measure_flops(config, DEFAULT, ratios, method=method, layers=layers, image_size=(448, 448)) == report.pruned


@pytest.mark.parametrize(
    "method",
    [m for m in POLICIES if m != "lvpruning" and (POLICIES[m].published.layers[0] >= 0 or POLICIES[m].tower_free)],
)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_each_method_analytic_matches_measured_with_its_overhead(method, family):
    config = tiny_qwen_vl_config(family, num_layers=5)
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.7, 0.35, 0.1), infer_ratios=(0.7, 0.35, 0.1))
    layers, ratios = (1, 2, 3), (0.75, 0.5, 0.25)
    report = analytic_flops(config, pruning, ratios, 12, method=method, layers=layers, image_size=(56, 56))
    assert (report.pruned_parts["policy"] > 0) == (method != "random")
    measured = measure_flops(config, pruning, ratios, 12, method=method, layers=layers, image_size=(56, 56))
    assert measured == report.pruned
    if POLICIES[method].tower_free:  # its vision-tower stage reads nothing of the tower: it runs on Qwen-VL
        report = analytic_flops(config, pruning, (0.5, 0.25), 12, method=method, layers=(-1, 2), image_size=(56, 56))
        measured = measure_flops(config, pruning, (0.5, 0.25), 12, method=method, layers=(-1, 2), image_size=(56, 56))
        assert measured == report.pruned
