"""FLOPs: the analytic count against FlopCounterMode on ``meta``, hand-computed cases, presets and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lvpruning.config import PruningConfig, paper_schedule
from lvpruning.decision import DecisionModule
from lvpruning.flops import (
    TOLERANCE,
    analytic_flops,
    decision_module_flops,
    decoder_layer_flops,
    dummy_inputs,
    image_layout,
    measure_flops,
    num_vision_tokens,
    tokens_per_layer,
)
from lvpruning.flops_cli import main
from lvpruning.policies import POLICIES
from lvpruning.presets import PRESETS, llava_15_7b_config, llava_15_13b_config, load_llava_config
from lvpruning.tiny import tiny_llava_config


def pruning_config(layers=(1, 8, 16), ratios=(0.5, 0.3, 0.1), **kwargs) -> PruningConfig:
    return PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, **kwargs)


def assert_close(measured: int, analytic: int) -> None:
    assert abs(measured / analytic - 1) < TOLERANCE, (measured, analytic)


TINY_CASES = [  # (tiny_llava_config overrides, text tokens)
    (dict(), 30),  # MHA: 4 heads, 4 layers
    (dict(num_heads=4, num_kv_heads=2, num_layers=5), 1),  # GQA, a single text token
    (dict(hidden_size=96, num_heads=6, num_kv_heads=1, intermediate_size=160, num_layers=6), 30),  # MQA
    (dict(vision_layers=3, vision_hidden=48, image_size=48, patch_size=8, num_kv_heads=2), 12),
]


@pytest.mark.parametrize("shape, text_tokens", TINY_CASES)
def test_analytic_matches_measured_on_tiny_configs(shape, text_tokens):
    config = tiny_llava_config(**shape)
    pruning = pruning_config(layers=(0, 1, 2), ratios=(0.7, 0.35, 0.1), num_heads=4, ffn_dim=40)
    report = analytic_flops(config, pruning, num_text_tokens=text_tokens)
    assert_close(measure_flops(config, num_text_tokens=text_tokens), report.baseline)
    assert_close(measure_flops(config, pruning, num_text_tokens=text_tokens), report.pruned)


def test_analytic_matches_measured_with_logits_at_the_last_position():
    config, pruning = tiny_llava_config(num_kv_heads=2), pruning_config(layers=(0, 2), ratios=(0.5, 0.2))
    report = analytic_flops(config, pruning, num_text_tokens=7, lm_head_positions="last")
    assert report.baseline_parts["lm_head"] == 2 * 64 * 128  # one position x hidden x vocab
    assert_close(measure_flops(config, None, None, 7, "last"), report.baseline)
    assert_close(measure_flops(config, pruning, None, 7, "last"), report.pruned)


def test_llava_7b_shaped_config_on_meta_without_weights():
    config = llava_15_7b_config()
    pruning = pruning_config(ratios=paper_schedule(0.5))
    report = analytic_flops(config, pruning, num_text_tokens=30)
    assert report.kept_vision_tokens == (288, 172, 57)
    assert 8.5e12 < report.baseline < 8.7e12
    assert_close(measure_flops(config, num_text_tokens=30), report.baseline)
    assert_close(measure_flops(config, pruning, num_text_tokens=30), report.pruned)


def test_one_llama_layer_by_hand():
    config = LlamaConfig(
        hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, attn_implementation="eager"
    )
    n = 3  # head_dim 4, k/v width 4 (one KV head)
    expected = {
        "llm_qkvo": 2 * n * 8 * 8 + 2 * (2 * n * 8 * 4) + 2 * n * 8 * 8,  # 384 + 384 + 384
        "llm_attention": 2 * (2 * n * n * 2 * 4),  # QK^T and AV, 2 heads of size 4: 288
        "llm_mlp": 3 * 2 * n * 8 * 16,  # gate, up, down: 2304
    }
    assert decoder_layer_flops(config, n) == expected == {"llm_qkvo": 1152, "llm_attention": 288, "llm_mlp": 2304}
    # ... and the real layer, eager attention (the config's attn_implementation), counts the same
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    hidden = torch.randn(1, n, 8)
    rope = LlamaRotaryEmbedding(config)(hidden, torch.arange(n)[None])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(hidden, attention_mask=None, position_embeddings=rope)
    assert counter.get_total_flops() == sum(expected.values())


def test_decision_module_by_hand_and_on_meta():
    c, q, t, f = 16, 5, 3, 24
    per_block = 2 * q * c * c + 2 * (2 * t * c * c) + 2 * (2 * q * t * c) + 2 * (2 * q * c * f)
    assert decision_module_flops(c, q, t, num_blocks=2, ffn_dim=f) == 2 * per_block + 2 * q * c * 2
    with torch.device("meta"):
        module = DecisionModule(c, num_blocks=2, num_heads=4, ffn_dim=f)
        args = torch.randn(1, q, c), torch.randn(1, t, c), torch.ones(1, t, dtype=torch.bool)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    assert counter.get_total_flops() == decision_module_flops(c, q, t, 2, f)


def test_tokens_per_stage_and_layer():
    report = analytic_flops(llava_15_7b_config(), pruning_config(ratios=paper_schedule(0.6)))
    assert report.num_vision_tokens == 576 and report.keep_ratios == (0.6, 0.4, 0.2)
    assert report.kept_vision_tokens == (345, 230, 115)  # floor(rho * 576), eq. 13
    assert report.tokens_per_layer == (606,) * 2 + (375,) * 7 + (260,) * 8 + (145,) * 15
    assert report.decision_per_stage == tuple(decision_module_flops(4096, q, 30) for q in (576, 345, 230))
    assert report.pruned == report.pruned_without_decision + report.decision
    assert report.reduction < report.reduction_without_decision
    # LLaVA reads CLIP's penultimate layer, but all 24 run: the last one is counted and reported as unused
    assert report.vision_unused * 24 == report.baseline_parts["vision_layers"]
    assert tokens_per_layer(4, (0, 2), (5, 2), 10, 3) == (13, 8, 8, 5)


def test_paper_schedule():
    assert paper_schedule(0.5) == (0.5, 0.3, 0.1)
    assert paper_schedule(0.45) == (0.45, 0.25, 0.05)
    assert paper_schedule(1.0, num_stages=2) == (1.0, 0.8)
    for rho in (0.4, 0.3, 1.2):
        with pytest.raises(ValueError, match="rho"):
            paper_schedule(rho)


def test_presets_and_dummy_inputs():
    assert {"llava-1.5-7b", "llava-1.5-13b"} <= set(PRESETS)
    big = llava_15_13b_config()
    assert (big.text_config.hidden_size, big.text_config.num_hidden_layers) == (5120, 40)
    config = load_llava_config("llava-1.5-7b")
    assert num_vision_tokens(config) == config.image_seq_length == 576
    assert config.image_token_id == 32000 and config.text_config.vocab_size == 32064
    inputs = dummy_inputs(config, 30, device="cpu")
    assert inputs["input_ids"].shape == (1, 606) and int((inputs["input_ids"] == 32000).sum()) == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336) and "image_sizes" not in inputs
    with pytest.raises(ValueError, match="presets"):
        load_llava_config("/nonexistent/llava")
    with pytest.raises(ValueError, match="only applies to LLaVA-NeXT"):
        image_layout(config, (500, 800))
    assert image_layout(config, (336, 336)).num_vision_tokens == 576


def test_cli_json(capsys, tmp_path):
    tiny_llava_config(num_kv_heads=2).save_pretrained(tmp_path)  # a local path: the config is all that is read
    assert main(["--model", str(tmp_path), "--layers", "0", "2", "--ratios", "0.5", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = {"baseline_tflops", "pruned_tflops", "decision_tflops", "reduction", "breakdown_tflops"}
    expected |= {"tokens_per_stage", "measured_baseline_tflops", "measured_pruned_tflops", "agreement"}
    assert expected <= set(out)
    assert out["tokens_per_stage"]["vision"] == [64, 32, 16]
    assert abs(out["agreement"]["baseline"]) < TOLERANCE and abs(out["agreement"]["pruned"]) < TOLERANCE
    assert out["reduction"] == pytest.approx(1 - out["pruned_tflops"] / out["baseline_tflops"])


def test_cli_table_for_the_7b_preset(capsys):
    assert main(["--rho", "0.6", "--no-measure"]) == 0  # the 7B measurement is covered above
    out = capsys.readouterr().out
    assert "576 -> 345 -> 230 -> 115" in out and "decision" in out and "measured" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rho", "0.3"], "rho"),
        (["--ratios", "0.3", "0.5", "0.1"], "increases"),
        (["--ratios", "0.5", "0.3"], "ratios for 3 layers"),
        (["--layers", "1", "8", "31"], "layers"),
        (["--text-tokens", "0"], "num_text_tokens"),
        (["--model", "/nonexistent/llava"], "cannot load"),
        (["--rho", "0.5", "--ratios", "0.5", "0.3", "0.1"], "not allowed"),
    ],
)
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--no-measure"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method", [m for m in POLICIES if m != "lvpruning" and POLICIES[m].published.layers[0] >= 0])
def test_each_method_analytic_matches_measured_with_its_overhead(method):
    """A training-free method's recomputed attention rows and TTV arithmetic are counted as the part ``policy``."""
    config = tiny_llava_config(num_kv_heads=2, num_layers=5)
    pruning = pruning_config(layers=(0, 1, 2), ratios=(0.7, 0.35, 0.1), num_heads=4)
    layers, ratios = (1, 2, 3), (0.75, 0.5, 0.25)
    report = analytic_flops(config, pruning, ratios, 12, method=method, layers=layers)
    assert report.method == method and "decision" not in report.pruned_parts
    assert (report.pruned_parts["policy"] > 0) == (method != "random")
    assert_close(measure_flops(config, pruning, ratios, 12, method=method, layers=layers), report.pruned)


def test_fastv_overhead_by_hand():
    """One recomputed row after layer 1 of 5: W_q on one token, W_k on every key, q k^T per head."""
    config = tiny_llava_config(num_kv_heads=2, num_layers=5)  # hidden 64, 4 heads of 16, 2 KV heads
    report = analytic_flops(config, pruning_config(layers=(1,), ratios=(0.5,)), method="fastv")
    n = 64 + 30
    assert report.pruned_parts["policy"] == 2 * 64 * 64 + 2 * n * 64 * 32 + 2 * n * 64


@pytest.mark.parametrize("method", list(POLICIES))
def test_each_method_at_its_published_7b_setting_on_meta(method, capsys):
    assert main(["--method", method, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    published = POLICIES[method].published
    assert out["method"] == method and out["keep_ratios"] == pytest.approx(list(published.ratios))
    assert tuple(out["layers"]) == published.layers
    assert abs(out["agreement"]["pruned"]) < TOLERANCE
    assert out["pruned_tflops"] < out["baseline_tflops"]


# ------------------------------------------------------------------------------- LLaVA-NeXT and LLaVA-OneVision

TEXT_CONFIGS = {  # tiny decoders: MHA Llama, GQA Mistral, GQA Qwen2 with q/k/v biases
    "llama": lambda: LlamaConfig(hidden_size=48, intermediate_size=72, num_attention_heads=4),
    "mistral": lambda: MistralConfig(
        hidden_size=40, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2, sliding_window=None
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=56, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1, use_sliding_window=False
    ),
}


def tiny_text(model_type: str) -> LlamaConfig | MistralConfig | Qwen2Config:
    text = TEXT_CONFIGS[model_type]()
    text.num_hidden_layers, text.vocab_size, text.bos_token_id, text.eos_token_id = 4, 100, 1, 2
    text.max_position_embeddings, text.tie_word_embeddings = 512, False
    return text


def tiny_next_config(model_type: str = "llama") -> LlavaNextConfig:
    """LLaVA-NeXT-shaped: a CLIP tower on 16-pixel tiles of 4-pixel patches (16 tokens + CLS), anyres over 1 x 2,
    2 x 1, 2 x 2, 3 x 1 and 1 x 3 tiles."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=tiny_text(model_type),
        image_token_id=99,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]],
    )


def tiny_onevision_config(model_type: str = "qwen2", max_tiles: int = 2) -> LlavaOnevisionConfig:
    """LLaVA-OneVision-shaped: a SigLIP tower (16 tokens per tile, all kept), grids up to 3 x 3, and features of
    more than ``max_tiles`` tiles' worth downscaled (``anyres_max_{max_tiles}``)."""
    vision = SiglipVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tiny_text(model_type),
        image_token_id=99,
        video_token_id=98,
        image_grid_pinpoints=[[h, w] for h in (16, 32, 48) for w in (16, 32, 48)],
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )


ANYRES_CASES = [  # (config, image size (H, W), tiles, vision tokens: base + unpadded grid + a newline per row)
    (tiny_next_config("llama"), (32, 32), 5, 16 + 8 * 8 + 8),  # 2 x 2 tiles
    (tiny_next_config("mistral"), (20, 44), 4, 16 + 4 * 8 + 4),  # 1 x 3 tiles: 4 x 12 unpadded to 4 x 8
    (tiny_next_config("qwen2"), (40, 13), 4, 16 + 12 * 4 + 12),  # 3 x 1 tiles, no padding to remove
    (tiny_onevision_config("qwen2", max_tiles=9), (30, 30), 5, 16 + 8 * 8 + 8),  # 2 x 2 <= 9 tiles: as is
    (tiny_onevision_config("qwen2"), (32, 32), 5, 16 + 5 * 5 + 5),  # 8 x 8 over 2 tiles' worth: / 1.41 -> 5 x 5
    (tiny_onevision_config("llama"), (30, 46), 7, 16 + 4 * 6 + 4),  # 2 x 3 tiles, 8 x 12 / 1.73 -> 4 x 6
]


@pytest.mark.parametrize("config, size, tiles, tokens", ANYRES_CASES)
def test_anyres_analytic_matches_measured_on_tiny_configs(config, size, tiles, tokens):
    layout = image_layout(config, size)
    assert (layout.num_tiles, layout.num_vision_tokens) == (tiles, tokens)
    pruning = pruning_config(layers=(0, 1, 2), ratios=(0.7, 0.35, 0.1), num_heads=4)
    report = analytic_flops(config, pruning, num_text_tokens=9, image_size=size)
    assert report.num_tiles == tiles and report.kept_vision_tokens == tuple(int(r * tokens) for r in (0.7, 0.35, 0.1))
    assert report.baseline_parts["projector"] % tiles == 0  # every tile's tokens, before the unpadding
    assert measure_flops(config, num_text_tokens=9, image_size=size) == report.baseline


@pytest.mark.parametrize(
    "preset, size",
    [
        ("llava-next-7b", (672, 672)),
        ("llava-next-mistral-7b", (672, 672)),
        ("llava-onevision-7b", (672, 672)),
        ("llava-next-7b", (336, 1008)),
        ("llava-onevision-7b", (500, 800)),
    ],
)
def test_anyres_7b_presets_on_meta_without_weights(preset, size):
    config = load_llava_config(preset)
    report = analytic_flops(config, pruning_config(ratios=paper_schedule(0.5)), image_size=size)
    assert_close(measure_flops(config, image_size=size), report.baseline)
    assert report.pruned < report.baseline


def test_llava_next_7b_vision_tokens_at_672():
    config = load_llava_config("llava-next-7b")
    layout = image_layout(config)  # 672 x 672 by default
    assert (layout.num_tiles, layout.grid, layout.tile_tokens) == (5, (2, 2), 576)
    assert layout.num_vision_tokens == 576 + 48 * 48 + 48 == 2928
    report = analytic_flops(config, pruning_config(ratios=paper_schedule(0.5)))
    assert report.kept_vision_tokens == (1464, 878, 292)
    inputs = dummy_inputs(config, 30)
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336) and inputs["input_ids"].shape == (1, 2958)
    assert inputs["image_sizes"].device.type == "cpu" and inputs["image_sizes"].tolist() == [[672, 672]]
    onevision = image_layout(load_llava_config("llava-onevision-7b"), (2000, 3000))  # 4 x 6 tiles: downscaled
    assert (onevision.num_tiles, onevision.num_vision_tokens) == (25, 729 + 66 * 99 + 66)


@pytest.mark.parametrize("config", [tiny_next_config("mistral"), tiny_onevision_config("qwen2")])
def test_anyres_pruned_analytic_matches_measured(config):
    pruning = pruning_config(layers=(0, 1, 2), ratios=(0.7, 0.35, 0.1), num_heads=4)
    report = analytic_flops(config, pruning, num_text_tokens=9, image_size=(30, 46))
    assert_close(measure_flops(config, pruning, num_text_tokens=9, image_size=(30, 46)), report.pruned)


def test_cli_anyres_json_and_table(capsys, tmp_path):
    tiny_next_config("mistral").save_pretrained(tmp_path)
    argv = ["--model", str(tmp_path), "--layers", "0", "2", "--ratios", "0.5", "0.25", "--image-size", "20", "44"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_size"] == [20, 44] and out["num_tiles"] == 4 and out["num_vision_tokens"] == 52
    assert abs(out["agreement"]["baseline"]) < TOLERANCE
    assert abs(out["agreement"]["pruned"]) < TOLERANCE
    assert main(["--model", "llava-onevision-7b", "--rho", "0.5", "--no-measure"]) == 0
    table = capsys.readouterr().out
    assert "1 image of 672 x 672 (5 tiles, 3699 vision tokens)" in table and "3699 -> 1849 -> 1109 -> 369" in table


def test_unsupported_model_type(tmp_path, capsys):
    LlamaConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'; supported: 'llava'"):
        load_llava_config(str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--no-measure"])
    assert "llava_onevision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image-size", "672", "672", "--no-measure"])  # LLaVA-1.5: 336 x 336 only
    assert "336 x 336" in capsys.readouterr().err


TOWER_ON_TILES = [  # (method, layers, keep ratios): VisionZip 8 per crop on a 2 x 2 grid (40 of 88), VScan, Random
    ("visionzip", (-1,), (40 / 88,)),
    ("visionzip", (-1,), (0.2,)),
    ("vscan", (-1, 1), (0.6, 0.1)),
    ("random", (-1, 1), (0.5, 0.2)),
    ("ptp", (-1, 1), (1.0, 0.2)),
]


@pytest.mark.parametrize("method, layers, ratios", TOWER_ON_TILES)
@pytest.mark.parametrize("size", [(32, 32), (20, 44)])  # 2 x 2 tiles; 1 x 3 with letterbox columns unpadded
def test_tower_methods_on_tiles_analytic_matches_measured(method, layers, ratios, size):
    """The vision-tower stage on LLaVA-NeXT runs once per tower pass: its overhead counted per pass (each pass's
    patches after the unpadding) equals what the engine runs on meta."""
    config = tiny_next_config("llama")
    pruning = pruning_config(layers=(0, 1, 2), ratios=(0.7, 0.35, 0.1), num_heads=4)
    kwargs = {"num_text_tokens": 9, "method": method, "layers": layers, "image_size": size}
    report = analytic_flops(config, pruning, ratios, **kwargs)
    assert (report.decision_per_stage[0] > 0) == (method != "random")
    assert measure_flops(config, pruning, ratios, **kwargs) == report.pruned


def test_tower_methods_that_read_cls_are_not_counted_on_onevision():
    config, pruning = tiny_onevision_config(), pruning_config(layers=(0,), ratios=(0.5,), num_heads=4)
    with pytest.raises(ValueError, match="visionzip ranks by the tower's CLS attention"):
        analytic_flops(config, pruning, (0.3,), method="visionzip", layers=(-1,))
    with pytest.raises(ValueError, match="vflowopt's vision-tower stage .* LLaVA-1.5 only"):
        analytic_flops(tiny_next_config(), pruning, (0.3, 0.3, 0.1), method="vflowopt", layers=(-1, 0, 1))
