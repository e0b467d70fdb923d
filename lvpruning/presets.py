"""Named LLaVA-1.5 configs built offline from their published hyperparameters (no hub access, no weights).

The values follow the ``llava-hf/llava-1.5-{7b,13b}-hf`` ``config.json`` files: a CLIP ViT-L/14-336 tower read at its
penultimate layer with the CLS token dropped (576 vision tokens), a 2-layer GELU projector, and a Vicuna (Llama)
text model with the llava-hf vocabulary of 32064 (32000 + the ``<image>`` and ``<pad>`` tokens, padded to 64).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

IMAGE_TOKEN_ID = 32000  # llava-hf's "<image>"
PAD_TOKEN_ID = 32001  # llava-hf's "<pad>"


def _clip_vit_l14_336() -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14-336's vision tower: 24 layers, width 1024, 16 heads, MLP 4096."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _llava_15(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,  # Vicuna-1.5 has no grouped-query attention
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=_clip_vit_l14_336(),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",  # Linear(1024, C) -> GELU -> Linear(C, C)
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop CLS: (336 / 14) ** 2 = 576 tokens
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B: Vicuna-7B (hidden 4096, 32 layers, 32 heads, MLP 11008)."""
    return _llava_15(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008)


def llava_15_13b_config() -> LlavaConfig:
    """LLaVA-1.5-13B: Vicuna-13B (hidden 5120, 40 layers, 40 heads, MLP 13824)."""
    return _llava_15(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824)


PRESETS: dict[str, Callable[[], LlavaConfig]] = {
    "llava-1.5-7b": llava_15_7b_config,
    "llava-1.5-13b": llava_15_13b_config,
}


def load_llava_config(name_or_path: str) -> LlavaConfig:
    """A preset name, or an HF hub id / local directory whose ``config.json`` is read (never the weights)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a config from {name_or_path!r} (presets: {sorted(PRESETS)}): {err}") from err
    if not isinstance(config, LlavaConfig):
        raise ValueError(f"{name_or_path!r} is a {type(config).__name__}, not a LlavaConfig")
    return config
