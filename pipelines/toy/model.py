"""The toy LLaVA: a named preset of ``lvpruning.tiny`` sized for the toy world (its numbers and initialisation).

64 vision tokens (an 8 x 8 grid of 8-pixel patches over a 64-pixel image) and a 4-layer Llama, so that pruning
stages fit in the model's own layers (e.g. after layers 0, 1, 2) and the base model trains on a CPU (how long:
``benchmarks/TOY_WORLD.md``, "Eighth round"; the file records the learning curves behind these numbers).

For the high-resolution world (``hires.HiresSpec``) the same sizes make a toy LLaVA-NeXT: the same tower on each
64 x 64 view (the base view and every tile), the same projector and Llama, plus the learned newline; its tile grids
are the world's aspects, and its prompts the processor's chat template.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaProcessor

from lvpruning.tiny import build_processor, tiny_llava, tiny_llava_config, tiny_tiled_config
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
VISION_POSITION_STD = 0.5  # scale of the CLIP position embeddings at init (CLIP: std 0.02); see build_toy_model


def toy_config(spec: WorldSpec | None = None, **overrides: float) -> LlavaConfig | LlavaNextConfig:
    """The toy model's config: image and patch sizes from ``spec``, the rest ``TOY_MODEL`` + overrides; a
    LLaVA-NeXT config (tiles of ``spec.tile``, one grid per aspect) for the high-resolution world."""
    spec = spec or SceneSpec()
    unknown = set(overrides) - set(TOY_MODEL)
    if unknown:
        raise ValueError(f"unknown toy model keys {sorted(unknown)}; known: {sorted(TOY_MODEL)}")
    sizes = {**TOY_MODEL, **overrides}
    if isinstance(spec, HiresSpec):  # up to 336 vision tokens + the conversation: past the low-res 256 positions
        sizes["max_position_embeddings"] = max(sizes["max_position_embeddings"], 1024)
        grid = tuple(ASPECTS[a] for a in ASPECTS)
        return tiny_tiled_config(tile_size=spec.tile, patch_size=spec.patch, grid=grid, num_kv_heads=None, **sizes)
    return tiny_llava_config(image_size=spec.image_size, patch_size=spec.patch, **sizes)


def toy_processor(config: LlavaConfig | LlavaNextConfig | None = None, spec: WorldSpec | None = None) -> Any:
    """The toy model's processor, whose tokenizer covers its template and every word of ``spec``'s questions: a
    ``LlavaProcessor`` (vicuna_v1), or for the high-resolution world a ``LlavaNextProcessor`` (chat template)."""
    spec = spec or SceneSpec()
    config = config or toy_config(spec)
    words = toy_words(spec.question_types)
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
