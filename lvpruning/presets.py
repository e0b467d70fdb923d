"""Named LLaVA configs built offline from their published hyperparameters (no hub access, no weights).

LLaVA-1.5 follows the ``llava-hf/llava-1.5-{7b,13b}-hf`` ``config.json`` files: a CLIP ViT-L/14-336 tower read at
its penultimate layer with the CLS token dropped (576 vision tokens), a 2-layer GELU projector, and a Vicuna (Llama)
text model with the llava-hf vocabulary of 32064 (32000 + the ``<image>`` and ``<pad>`` tokens, padded to 64).
LLaVA-NeXT (1.6) and LLaVA-OneVision add "anyres": the tower also runs on a grid of tiles of the image (see
``lvpruning.flops.image_layout``). Qwen2-VL and Qwen2.5-VL follow the ``Qwen/Qwen2-VL-7B-Instruct`` and
``Qwen/Qwen2.5-VL-{7B,3B}-Instruct`` ``config.json`` files, written here from the published files (nothing can be
downloaded here): their towers see the image at its own resolution (see ``lvpruning.flops_qwen``). Qwen3-VL-8B
follows ``Qwen/Qwen3-VL-8B-Instruct``'s ``config.json`` (where each number comes from: ``docs/flops.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

IMAGE_TOKEN_ID = 32000  # llava-hf's "<image>"
PAD_TOKEN_ID = 32001  # llava-hf's "<pad>"
AnyLlavaConfig: TypeAlias = (
    LlavaConfig | LlavaNextConfig | LlavaOnevisionConfig | Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig
)
SUPPORTED_CONFIGS = (LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig, Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig)
# Qwen-VL's special tokens (the Qwen2 tokenizer's <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>)
QWEN_VL_TOKENS = {"vision_start": 151652, "vision_end": 151653, "image": 151655, "video": 151656}
# LLaVA-NeXT's anyres resolutions (H, W), in pixels: 2 x 1, 1 x 2, 2 x 2, 3 x 1 and 1 x 3 tiles of 336
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# OneVision's anyres_max_9: every grid of 1 to 6 x 1 to 6 tiles of 384 (features downscaled past 9 tiles' worth)
ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


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


def _vicuna(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> LlamaConfig:
    """Vicuna-1.5 with llava-hf's vocabulary, as in LLaVA-1.5 and LLaVA-NeXT (Vicuna)."""
    return LlamaConfig(
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


def _llava_15(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> LlavaConfig:
    return LlavaConfig(
        vision_config=_clip_vit_l14_336(),
        text_config=_vicuna(hidden_size, num_layers, num_heads, intermediate_size),
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


def _llava_next(text: LlamaConfig | MistralConfig) -> LlavaNextConfig:
    """LLaVA-NeXT: LLaVA-1.5's tower, feature selection and projector, anyres over 336-pixel tiles."""
    return LlavaNextConfig(
        vision_config=_clip_vit_l14_336(),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # 576 tokens per tile
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def llava_next_7b_config() -> LlavaNextConfig:
    """LLaVA-NeXT-7B (``llava-hf/llava-v1.6-vicuna-7b-hf``): Vicuna-7B, as in LLaVA-1.5-7B."""
    return _llava_next(_vicuna(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008))


def llava_next_mistral_7b_config() -> LlavaNextConfig:
    """LLaVA-NeXT-Mistral-7B (``llava-hf/llava-v1.6-mistral-7b-hf``): Mistral-7B-Instruct-v0.2 (hidden 4096, 32
    layers, 32 query and 8 key/value heads, MLP 14336, no sliding window) with llava-hf's 32064 vocabulary."""
    text = MistralConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return _llava_next(text)


def llava_onevision_7b_config() -> LlavaOnevisionConfig:
    """LLaVA-OneVision-7B (``llava-hf/llava-onevision-qwen2-7b-ov-hf``): SigLIP so400m-patch14-384 (26 layers, width
    1152, MLP 4304, no pooling head) read at its last layer, all 729 tokens per tile (no CLS), a 2-layer GELU
    projector, and Qwen2-7B (hidden 3584, 28 layers, 28 query and 4 key/value heads, MLP 18944, q/k/v biases)."""
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=152128,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=151646,
        video_token_id=151647,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",  # SigLIP has no CLS: (384 // 14) ** 2 = 729 tokens per tile
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def _qwen_vl_text(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
) -> dict:
    """A Qwen-VL decoder (Qwen2 with q/k/v biases and M-RoPE, ``mrope_section`` [16, 24, 24] of the 64 rotary
    frequencies for time, height and width)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _qwen_vl_tokens() -> dict[str, int]:
    return {f"{name}_token_id": token for name, token in QWEN_VL_TOKENS.items()}


def qwen2_vl_7b_config() -> Qwen2VLConfig:
    """Qwen2-VL-7B (``Qwen/Qwen2-VL-7B-Instruct``): a 675M ViT (32 blocks, width 1280, 16 heads, MLP 5120 with
    QuickGELU, full attention, 14-pixel patches over 2 frames) and a 2 x 2 merger into Qwen2-7B (hidden 3584, 28
    layers, 28 query and 4 key/value heads, MLP 18944, vocabulary 152064)."""
    vision = {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "hidden_size": 3584,  # the merger's output: the decoder's width
        "hidden_act": "quick_gelu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    text = _qwen_vl_text(3584, 28, 28, 4, 18944, 152064, 32768, tie_word_embeddings=False)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_vl_tokens())


def _qwen25_vl(text: dict) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL: the same ViT at 7B and 3B (32 blocks, width 1280, 16 heads, gated SwiGLU MLP 3420, RMSNorm,
    window attention over 112-pixel windows except blocks 7, 15, 23 and 31), merged 2 x 2 into ``text``."""
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": text["hidden_size"],
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    }
    tie = text["tie_word_embeddings"]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **_qwen_vl_tokens())


def qwen25_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B (``Qwen/Qwen2.5-VL-7B-Instruct``): hidden 3584, 28 layers, 28 query and 4 key/value heads,
    MLP 18944, vocabulary 152064, untied lm_head."""
    return _qwen25_vl(_qwen_vl_text(3584, 28, 28, 4, 18944, 152064, 128000, tie_word_embeddings=False))


def qwen25_vl_3b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B (``Qwen/Qwen2.5-VL-3B-Instruct``): hidden 2048, 36 layers, 16 query and 2 key/value heads,
    MLP 11008, vocabulary 151936, lm_head tied to the embeddings (still one matmul)."""
    return _qwen25_vl(_qwen_vl_text(2048, 36, 16, 2, 11008, 151936, 128000, tie_word_embeddings=True))


def qwen3_vl_8b_config() -> Qwen3VLConfig:
    """Qwen3-VL-8B (``Qwen/Qwen3-VL-8B-Instruct``): a ViT of 27 blocks (width 1152, 16 heads, GELU MLP 4304,
    LayerNorm, full attention, 16-pixel patches over 2 frames, a learned 48 x 48 position grid resampled to each
    image), a 2 x 2 merger into the decoder's width, and three DeepStack mergers on the outputs of blocks 8, 16 and
    24 whose features are added after decoder layers 0, 1 and 2; a Qwen3 decoder (hidden 4096, 36 layers, 32 query
    and 8 key/value heads of width 128 with q/k RMSNorms, no biases, MLP 12288, vocabulary 151936, untied lm_head,
    interleaved M-RoPE ``mrope_section`` [24, 20, 20], theta 5e6)."""
    vision = {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    }
    text = {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_vl_tokens())


PRESETS: dict[str, Callable[[], AnyLlavaConfig]] = {
    "llava-1.5-7b": llava_15_7b_config,
    "llava-1.5-13b": llava_15_13b_config,
    "llava-next-7b": llava_next_7b_config,
    "llava-next-mistral-7b": llava_next_mistral_7b_config,
    "llava-onevision-7b": llava_onevision_7b_config,
    "qwen2-vl-7b": qwen2_vl_7b_config,
    "qwen2.5-vl-7b": qwen25_vl_7b_config,
    "qwen2.5-vl-3b": qwen25_vl_3b_config,
    "qwen3-vl-8b": qwen3_vl_8b_config,
}


def load_llava_config(name_or_path: str) -> AnyLlavaConfig:
    """A preset name, or an HF hub id / local directory whose ``config.json`` is read (never the weights): a
    ``LlavaConfig``, ``LlavaNextConfig``, ``LlavaOnevisionConfig``, ``Qwen2VLConfig``, ``Qwen2_5_VLConfig`` or
    ``Qwen3VLConfig``."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a config from {name_or_path!r} (presets: {sorted(PRESETS)}): {err}") from err
    if not isinstance(config, SUPPORTED_CONFIGS):
        supported = ", ".join(f"{c.model_type!r} ({c.__name__})" for c in SUPPORTED_CONFIGS)
        raise ValueError(f"{name_or_path!r} has model_type {config.model_type!r}; supported: {supported}")
    return config
