"""``benchmarks/prefill.py``'s arguments and reduced configs (shapes only), and its Qwen-VL path on tiny random
models: each timed call, counted by FlopCounterMode, does the FLOPs that ``lvpruning.flops`` predicts for it."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.prefill import LAYERS, RHOS, build, measure, prefill_parser, reduced_7b_config, settings
from lvpruning import PruningConfig, paper_schedule
from lvpruning.flops import analytic_flops, image_layout
from lvpruning.presets import load_llava_config
from lvpruning.tiny import tiny_qwen_vl_config


@pytest.mark.parametrize("model", ["llava-1.5-7b", "llava-next-7b", "llava-next-mistral-7b"])
def test_reduced_config_keeps_the_shape(model):
    """Depth, tiles, vision tokens, head size, GQA ratio and proportions of the preset, at width 512."""
    full, small = load_llava_config(model), reduced_7b_config(512, model)
    t, s = full.text_config, small.text_config
    assert type(small) is type(full) and type(s) is type(t)
    assert image_layout(small) == image_layout(full)  # NeXT: 5 tiles, 2,928 vision tokens
    assert s.num_hidden_layers == t.num_hidden_layers and s.head_dim == t.hidden_size // t.num_attention_heads
    assert s.num_attention_heads * s.head_dim == 512 and s.intermediate_size == int(512 * t.intermediate_size / 4096)
    assert s.num_attention_heads // s.num_key_value_heads == t.num_attention_heads // t.num_key_value_heads
    assert (small.vision_config.hidden_size, small.vision_config.intermediate_size) == (128, 512)


def test_reduced_config_rejects_a_width_without_whole_heads():
    with pytest.raises(ValueError, match="multiple of 896"):
        reduced_7b_config(512, "llava-onevision-7b")  # 7 query heads of 128 per key/value head


def test_parser():
    args = prefill_parser().parse_args(["--model", "llava-next-7b", "--image-size", "336", "1008"])
    assert (args.model, args.image_size, args.hidden) == ("llava-next-7b", [336, 1008], 512)
    defaults = prefill_parser().parse_args([])
    assert (defaults.model, defaults.image_size) == ("llava-1.5-7b", None)
    assert image_layout(reduced_7b_config(512, "llava-next-7b"), [336, 1008]).num_vision_tokens == 2328


@pytest.mark.parametrize(
    ("model", "hidden"), [("qwen2.5-vl-7b", 1792), ("qwen2.5-vl-3b", 1024), ("qwen2-vl-7b", 896), ("qwen3-vl-8b", 1024)]
)
def test_reduced_qwen_config_keeps_the_shape(model, hidden):
    """Qwen-VL: the decoder as for LLaVA, the ViT's depth and patch grid kept (576 vision tokens at 672 x 672;
    Qwen3-VL 441), its width scaled to a multiple of 16 over 4 heads, the merger's output the reduced width."""
    full, small = load_llava_config(model), reduced_7b_config(hidden, model)
    t, s, v, w = full.text_config, small.text_config, full.vision_config, small.vision_config
    assert type(small) is type(full) and image_layout(small) == image_layout(full)
    assert image_layout(small).num_vision_tokens == (441 if model == "qwen3-vl-8b" else 576)
    assert s.num_hidden_layers == t.num_hidden_layers and s.num_attention_heads * 128 == hidden
    assert s.num_attention_heads // s.num_key_value_heads == t.num_attention_heads // t.num_key_value_heads
    assert s.intermediate_size == int(hidden * t.intermediate_size / t.hidden_size)
    assert (w.depth, w.patch_size, w.num_heads) == (v.depth, v.patch_size, 4)
    scale = hidden / t.hidden_size
    if model == "qwen2-vl-7b":
        assert w.hidden_size == hidden and w.embed_dim == 16 * round(v.embed_dim * scale / 16)
        assert w.mlp_ratio == v.mlp_ratio
    else:
        assert w.out_hidden_size == hidden and w.hidden_size == 16 * round(v.hidden_size * scale / 16)
        assert w.intermediate_size == round(v.intermediate_size * scale)


def test_qwen25_vl_7b_at_896():
    """The width the issue's run uses: 7 query heads and 1 key/value head, a ViT of width 320 (4 heads of 80)."""
    small = reduced_7b_config(896, "qwen2.5-vl-7b")
    assert (small.text_config.num_attention_heads, small.text_config.num_key_value_heads) == (7, 1)
    assert (small.vision_config.hidden_size, small.vision_config.intermediate_size) == (320, 855)
    with pytest.raises(ValueError, match="multiple of 896"):
        reduced_7b_config(512, "qwen2.5-vl-7b")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_qwen_runs_do_the_predicted_flops(family):
    """Each timed call on a tiny random Qwen-VL (18 layers: LAYERS 1, 8, 16 fit), counted by FlopCounterMode as it
    runs, does exactly the FLOPs its row predicts, which are ``lvpruning.flops``'s analytic count; the prompt is
    the processor's (the pads between <|vision_start|> and <|vision_end|>, image_grid_thw of the image's patches)."""
    config = tiny_qwen_vl_config(family, num_layers=18)
    argv = ["--image-size", "56", "60", "--text-tokens", "9", "--rhos", "0.5", "0.45", "--baselines", "fastv", "random"]
    args = prefill_parser().parse_args([*argv, "--repeats", "1", "--warmup", "0"])
    model, inputs = build(config, args)
    n = image_layout(config, args.image_size).num_vision_tokens
    # smart_resize to multiples of 8 (patches of 4, merged 2 x 2): 56 x 64; Qwen3-VL's at least 256 x 256 pixels
    grid = [1, 62, 68] if family == "qwen3_vl" else [1, 14, 16]
    assert inputs["image_grid_thw"].tolist() == [grid] and inputs["pixel_values"].shape == (grid[1] * grid[2], 96)
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == config.vision_start_token_id and ids[n + 1] == config.vision_end_token_id
    assert ids[1 : n + 1] == [config.image_token_id] * n and len(ids) == n + 9
    timed = settings(config, model, inputs, args)
    assert [(s.method, s.modules) for s in timed[:5]] == [
        ("-", "-"),
        ("lvpruning", "full"),
        ("lvpruning", "slim"),
        ("fastv", "-"),
        ("random", "-"),
    ]
    count = {"num_text_tokens": 9, "lm_head_positions": "last", "image_size": (56, 60)}
    for s in timed:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            s.run()
        assert counter.get_total_flops() == s.flops, (s.schedule, s.method, s.modules)
        if s.method == "lvpruning":
            pruning = PruningConfig(layers=LAYERS, num_heads=8, decision_dim=None if s.modules == "full" else 8)
            ratios = paper_schedule(float(s.schedule.split()[0].removeprefix("rho=")))
            assert s.flops == analytic_flops(config, pruning, ratios, **count).pruned
    assert timed[0].flops == analytic_flops(config, PruningConfig(layers=LAYERS), **count).baseline
    assert len({s.flops for s in timed}) == len(timed)  # every schedule and method prunes differently


def test_measure_reports_every_setting():
    config = tiny_qwen_vl_config("qwen2_5_vl", num_layers=18)
    args = prefill_parser().parse_args(["--image-size", "56", "56", "--text-tokens", "5", "--repeats", "1"])
    args.warmup = 0
    info, rows = measure(config, args)
    assert (info["vision_tokens"], info["hidden"]) == (49, 64) and 0 < info["tower_share"] < 1
    assert [(r["schedule"].split()[0], r["modules"]) for r in rows] == [("none", "-")] + [
        (f"rho={rho}", m) for rho in RHOS for m in ("full", "slim")
    ]
    for row in rows:
        assert row["median_ms"] > 0 and row["efficiency"] == pytest.approx(row["speedup"] / row["flops_speedup"], 1e-2)
