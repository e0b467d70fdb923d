"""Generation with pruning: prune once in the prefill, then decode with per-segment (shorter) KV caches.

Batches of prompts of different lengths work with left padding (``tokenizer.padding_side = "left"``), as with
Hugging Face ``generate``. Sampling uses transformers' own logits warpers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lvpruning.policies import PruningPolicy


def _eos_ids(pruner: nn.Module, eos_token_id: int | list[int] | None) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = pruner.model.generation_config.eos_token_id
        if eos_token_id is None:
            eos_token_id = pruner.adapter.text_config.eos_token_id
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _pad_id(pruner: nn.Module, pad_token_id: int | None, eos: torch.Tensor) -> int:
    """The id that fills finished samples: ``pad_token_id``, else the model's, else the first end-of-sequence id."""
    if pad_token_id is None:
        pad_token_id = pruner.adapter.text_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    return pad_token_id


def _warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' sampling warpers, in ``generate``'s order; none for the neutral values."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def generate(
    pruner: nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    keep_ratios: tuple[float, ...] | None = None,
    policy: PruningPolicy | None = None,
    layers: tuple[int, ...] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy (default) or sampled decoding with an :class:`~lvpruning.engine.LVPruningModel` ``pruner``, pruning
    with ``policy`` after ``layers`` at ``keep_ratios`` (its forward's defaults); ``image_sizes`` beside a tiled
    family's ``pixel_values``, ``image_grid_thw`` beside Qwen-VL's. Returns (B, N + new) token ids: the
    prompt followed by the new tokens; a sample that finished early is filled with ``pad_token_id``, like Hugging
    Face ``generate``."""
    if pruner.training:
        raise RuntimeError("generate() runs in inference mode: call .eval() first")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() needs left-padded prompts: set tokenizer.padding_side = 'left'")
    eos = _eos_ids(pruner, eos_token_id).to(input_ids.device)
    pad_token_id = _pad_id(pruner, pad_token_id, eos)
    warpers = _warpers(temperature, top_k, top_p) if do_sample else LogitsProcessorList()

    out = pruner(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        image_sizes=image_sizes,
        image_grid_thw=image_grid_thw,
        keep_ratios=keep_ratios,
        policy=policy,
        layers=layers,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.cache, out.logits[:, -1]
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        sequence = torch.cat([input_ids, *tokens], dim=1) if tokens else input_ids
        scores = warpers(sequence, logits.float())
        if do_sample:
            next_token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            next_token = scores.argmax(dim=-1)
        next_token = torch.where(unfinished, next_token, pad_token_id)
        tokens.append(next_token[:, None])
        unfinished &= ~torch.isin(next_token, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        logits = pruner.decode_step(next_token[:, None], cache)[:, -1]
    return torch.cat([input_ids, *tokens], dim=1)
