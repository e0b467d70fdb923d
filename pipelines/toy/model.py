"""The toy LLaVA: a named preset of ``lvpruning.tiny`` sized for the toy world (its numbers and initialisation).

64 vision tokens (an 8 x 8 grid of 8-pixel patches over a 64-pixel image) and a 4-layer Llama, so that pruning
stages fit in the model's own layers (e.g. after layers 0, 1, 2) and the base model trains on a CPU (how long:
``benchmarks/TOY_WORLD.md``, "Eighth round"; the file records the learning curves behind these numbers).

For the high-resolution world (``hires.HiresSpec``) the same sizes make a toy LLaVA-NeXT: the same tower on each
64 x 64 view (the base view and every tile), the same projector and Llama, plus the learned newline; its tile grids
are the world's aspects, and its prompts the processor's chat template.

With ``family="qwen2_5_vl"`` the same sizes make a toy Qwen2.5-VL (its ViT with window attention and 2 x 2 patch
merger, a Qwen2 decoder with M-RoPE; 4-pixel patches, so a 64-pixel image is again 8 x 8 = 64 vision tokens) and its
processor (chat template, images at their own size: a 128 x 128 image of the high-resolution world is 256 tokens,
a 64 x 128 one 128): :func:`qwen_from_llava` carries a trained toy LLaVA's decoder and word embeddings into it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from lvpruning.tiny import build_processor, tiny_llava, tiny_llava_config, tiny_qwen_vl_config, tiny_tiled_config
from pipelines.toy.hires import ASPECTS, HiresSpec
from pipelines.toy.scenes import SceneSpec, WorldSpec, toy_words

TOY_MODEL: dict[str, float] = {
    "vocab_size": 96,
    "vision_hidden": 64,
    "vision_layers": 2,
    "hidden_size": 128,  # 96 was too narrow to learn the toy world: see benchmarks/TOY_WORLD.md, "Fifth round"
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,  # ~ hidden_size ** -0.5; 0.02 learns slower: benchmarks/TOY_WORLD.md, "Third round"
}
TOY_FAMILIES = ("llava", "qwen2_5_vl")  # the toy LLaVA (LLaVA-NeXT for the high-resolution world), or Qwen2.5-VL
VARIANT_FAMILIES = {  # by data.toy_variant
    "default": "llava",
    "hires": "llava",
    "qwen": "qwen2_5_vl",
    "large": "llava",
    "qwen_hires": "qwen2_5_vl",
}
TOY_NEXT_ASPECTS = ("square", "wide", "tall")  # the toy LLaVA-NeXT's own tile grids (a world's larger ones added)
VISION_POSITION_STD = 0.5  # scale of the CLIP position embeddings at init (CLIP: std 0.02); see build_toy_model


def toy_config(
    spec: WorldSpec | None = None, family: str = "llava", **overrides: float
) -> LlavaConfig | LlavaNextConfig | Qwen2_5_VLConfig:
    """The toy model's config: image and patch sizes from ``spec``, the rest ``TOY_MODEL`` + overrides; a
    LLaVA-NeXT config (tiles of ``spec.tile``, one grid per aspect) for the high-resolution world; a Qwen2.5-VL
    config for ``family="qwen2_5_vl"`` (patches of half ``spec.patch``, merged 2 x 2 into one vision token per
    ``spec.patch`` pixels, as the toy LLaVA's; on the high-resolution world the same model reads each image whole,
    at its own size)."""
    spec = spec or SceneSpec()
    if family not in TOY_FAMILIES:
        raise ValueError(f"unknown toy model family {family!r}; choose from {TOY_FAMILIES}")
    unknown = set(overrides) - set(TOY_MODEL)
    if unknown:
        raise ValueError(f"unknown toy model keys {sorted(unknown)}; known: {sorted(TOY_MODEL)}")
    sizes = {**TOY_MODEL, **overrides}
    if family == "qwen2_5_vl":
        half = sizes["hidden_size"] // sizes["num_heads"] // 2  # M-RoPE splits it as Qwen2.5-VL-7B: 1/4, 3/8, 3/8
        config = tiny_qwen_vl_config(
            "qwen2_5_vl",
            vocab_size=sizes["vocab_size"],
            patch_size=spec.patch // 2,
            vision_hidden=sizes["vision_hidden"],
            vision_layers=sizes["vision_layers"],
            hidden_size=sizes["hidden_size"],
            num_layers=sizes["num_layers"],
            num_heads=sizes["num_heads"],
            num_kv_heads=sizes["num_heads"],
            mrope_section=(half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8),
            max_position_embeddings=sizes["max_position_embeddings"],
            initializer_range=sizes["initializer_range"],
        )
        config.text_config.rms_norm_eps = 1e-6  # Qwen2.5-VL-7B's, and the toy LLaVA's (Llama's)
        return config
    if isinstance(spec, HiresSpec):  # 336 vision tokens + the conversation: past the low-res 256 positions (RoPE has
        # no table: the large world's 1,120 run past this bound, read by the hires model given its grid)
        sizes["max_position_embeddings"] = max(sizes["max_position_embeddings"], 1024)
        grid = tuple(dict.fromkeys(ASPECTS[a] for a in (*TOY_NEXT_ASPECTS, *spec.aspects)))
        return tiny_tiled_config(tile_size=spec.tile, patch_size=spec.patch, grid=grid, num_kv_heads=None, **sizes)
    return tiny_llava_config(image_size=spec.image_size, patch_size=spec.patch, **sizes)


def toy_processor(
    config: LlavaConfig | LlavaNextConfig | Qwen2_5_VLConfig | None = None, spec: WorldSpec | None = None
) -> Any:
    """The toy model's processor, whose tokenizer covers its template and every word of ``spec``'s questions: a
    ``LlavaProcessor`` (vicuna_v1), or for the high-resolution world a ``LlavaNextProcessor`` (chat template), or
    for a Qwen2.5-VL config ``lvpruning.tiny``'s image-only Qwen2.5-VL processor (chat template; an image of the
    toy world, 64 x 64, is 64 vision tokens; up to the largest image of a high-resolution world, unresized)."""
    spec = spec or SceneSpec()
    config = config or toy_config(spec)
    words = toy_words(spec.question_types)
    if isinstance(config, Qwen2_5_VLConfig) and isinstance(spec, HiresSpec):
        largest = max(math.prod(spec.image_size(aspect)) for aspect in spec.aspects)
        return build_processor(config, words=words, max_pixels=largest)
    return build_processor(config, words=words)


def build_toy_model(
    config: LlavaConfig | None = None, seed: int = 0, vision_position_std: float | None = VISION_POSITION_STD
) -> LlavaForConditionalGeneration:
    """A randomly initialised toy LLaVA (fp32, eval mode); the training job turns it into the base model.

    CLIP starts its position embeddings as noise of std 0.02, ~25x below what a patch of these images contributes,
    so the background tokens all look alike and nothing says where a token is. Here they start as the fixed 2-D
    sine-cosine table (``sincos_2d``) scaled to std ``vision_position_std``, the scale of the patch embeddings, and
    still train (None: CLIP's own init; ``benchmarks/TOY_WORLD.md``, rounds three and six).
    """
    model = tiny_llava(config or toy_config(), seed=seed)
    if vision_position_std is not None:
        weight = vision_position_embeddings(model)  # (1 + grid * grid, width): CLS first
        table = sincos_2d(math.isqrt(weight.shape[0] - 1), weight.shape[1])
        with torch.no_grad():
            weight[0] = 0.0
            weight[1:] = table * (vision_position_std / table.std())
    return model


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of a ``grid x grid`` patch grid in raster order, as MAE's (He et
    al., 2022): the first half of the channels encodes the row, the second the column, each as ``sin`` then ``cos``
    of ``position * 10000 ** (-i / (width / 4))`` for ``i < width / 4``. Returns (grid * grid, width)."""
    if width % 4:
        raise ValueError(f"2-D sine-cosine embeddings need a width divisible by 4, got {width}")
    omega = 10000.0 ** (-torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (width / 4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    halves = []
    for position in (rows.flatten(), cols.flatten()):
        angles = position[:, None].double() * omega[None]  # (grid * grid, width / 4)
        halves += [angles.sin(), angles.cos()]
    return torch.cat(halves, dim=1).float()


def vision_position_embeddings(model: LlavaForConditionalGeneration) -> torch.nn.Parameter:
    """The CLIP tower's position embeddings, (1 + patches, width): CLS first."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).embeddings.position_embedding.weight


def save_toy_model(path: str | Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> Path:
    """Save model and processor side by side, loadable by path like ``llava-hf/llava-1.5-7b-hf`` by id."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# Qwen's tokens that play a toy LLaVA token's part: its end of turn is where the toy LLaVA ends its answer (</s>).
QWEN_FROM_LLAVA_TOKENS = {"<|im_end|>": "</s>", "<|image_pad|>": "<image>"}


def qwen_from_llava(
    llava: LlavaForConditionalGeneration, llava_tokenizer: Any, qwen: Qwen2_5_VLForConditionalGeneration, tokenizer: Any
) -> Qwen2_5_VLForConditionalGeneration:
    """``qwen`` with the decoder of the toy LLaVA ``llava``: every layer's attention (q/k/v biases zero: a Llama's have
    none), MLP and norms, the final norm, and the rows of the input and output embeddings of every token the two
    tokenizers share (by its text), and of the tokens of :data:`QWEN_FROM_LLAVA_TOKENS` from their toy LLaVA
    counterparts (so it stops after an answer as the toy LLaVA does); the others, e.g. Qwen's vision-span tokens,
    keep ``qwen``'s own. Qwen2's decoder
    is Llama's plus those biases, and M-RoPE on text (its three position axes equal) is Llama's RoPE, so on text
    alone the result gives the toy LLaVA's logits. The vision tower and merger stay ``qwen``'s: another tower."""
    source, target = llava.model.language_model, qwen.model.language_model
    if (source.config.hidden_size, len(source.layers)) != (target.config.hidden_size, len(target.layers)):
        raise ValueError("the toy LLaVA and the toy Qwen2.5-VL have decoders of other sizes")
    with torch.no_grad():
        missing = target.load_state_dict({k: v for k, v in source.state_dict().items() if "embed" not in k}, False)
        if any(not name.endswith("_proj.bias") and "embed" not in name for name in missing.missing_keys):
            raise ValueError(f"the decoders do not match: {missing.missing_keys[:5]}")
        for name in missing.missing_keys:
            if name.endswith("_proj.bias"):
                target.get_parameter(name).zero_()
        theirs, ours = llava_tokenizer.get_vocab(), tokenizer.get_vocab()
        pairs = [(t, t) for t in sorted(set(theirs) & set(ours))]
        pairs += [(t, was) for t, was in QWEN_FROM_LLAVA_TOKENS.items() if t in ours and was in theirs]
        rows = torch.tensor([ours[t] for t, _ in pairs])
        from_rows = torch.tensor([theirs[was] for _, was in pairs])
        target.embed_tokens.weight[rows] = source.embed_tokens.weight[from_rows]
        qwen.lm_head.weight[rows] = llava.lm_head.weight[from_rows]
    return qwen
