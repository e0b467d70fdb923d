"""The toy LLaVA: a named preset of ``lvpruning.tiny`` sized for the toy world (numbers only, no wiring).

64 vision tokens (an 8 x 8 grid of 8-pixel patches over a 64-pixel image) and a 4-layer Llama, so that pruning
stages fit in the model's own layers (e.g. after layers 0, 1, 2) and the base model trains on 2 CPU cores in
minutes. ``benchmarks/TOY_WORLD.md`` records the learning curves behind these numbers.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from lvpruning.tiny import build_processor, tiny_llava, tiny_llava_config
from pipelines.toy.scenes import SceneSpec, toy_words

TOY_MODEL: dict[str, int] = {
    "vocab_size": 96,
    "vision_hidden": 64,
    "vision_layers": 2,
    "hidden_size": 96,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 192,
    "max_position_embeddings": 256,
}


def toy_config(spec: SceneSpec | None = None, **overrides: int) -> LlavaConfig:
    """The toy model's config: image and patch sizes from ``spec``, the rest ``TOY_MODEL`` + overrides."""
    spec = spec or SceneSpec()
    unknown = set(overrides) - set(TOY_MODEL)
    if unknown:
        raise ValueError(f"unknown toy model keys {sorted(unknown)}; known: {sorted(TOY_MODEL)}")
    sizes = {**TOY_MODEL, **overrides}
    return tiny_llava_config(image_size=spec.image_size, patch_size=spec.patch, **sizes)


def toy_processor(config: LlavaConfig | None = None) -> LlavaProcessor:
    """A ``LlavaProcessor`` whose tokenizer covers the vicuna_v1 template and every toy word."""
    return build_processor(config or toy_config(), words=toy_words())


def build_toy_model(config: LlavaConfig | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised toy LLaVA (fp32, eval mode); the training job turns it into the base model."""
    return tiny_llava(config or toy_config(), seed=seed)


def save_toy_model(path: str | Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> Path:
    """Save model and processor side by side, loadable by path like ``llava-hf/llava-1.5-7b-hf`` by id."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
