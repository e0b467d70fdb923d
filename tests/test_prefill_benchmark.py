"""``benchmarks/prefill.py``'s arguments and reduced configs (shapes only: nothing is built or timed)."""

from __future__ import annotations

import pytest

from benchmarks.prefill import prefill_parser, reduced_7b_config
from lvpruning.flops import image_layout
from lvpruning.presets import load_llava_config


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
