"""Tiny models and random LLaVA-shaped batches for the method's tests."""

from __future__ import annotations

import pytest
import torch

from lvpruning import PruningConfig, attach
from lvpruning.tiny import tiny_llava, tiny_llava_config

IMAGE_TOKEN = 4
VOCAB = 128
NUM_VISION = 64  # (32 / 4) ** 2 patches


def make_batch(
    lengths: list[tuple[int, int]],
    seed: int = 0,
    padding_side: str = "left",
    answer_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """One image per sample: ``[BOS, a text tokens, <image> x 64, b text tokens]`` for each ``(a, b)``.

    With ``answer_tokens`` the last ones are supervised ``labels`` (the rest -100), as in LLaVA training."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        [
            1,
            *torch.randint(10, VOCAB, (a,), generator=g).tolist(),
            *[IMAGE_TOKEN] * NUM_VISION,
            *torch.randint(10, VOCAB, (b,), generator=g).tolist(),
        ]
        for a, b in lengths
    ]
    N = max(map(len, samples))
    input_ids = torch.full((len(samples), N), 3)
    attention_mask = torch.zeros(len(samples), N, dtype=torch.long)
    labels = torch.full((len(samples), N), -100)
    for i, s in enumerate(samples):
        span = slice(N - len(s), N) if padding_side == "left" else slice(0, len(s))
        input_ids[i, span] = torch.tensor(s)
        attention_mask[i, span] = 1
        if answer_tokens:
            end = span.stop
            labels[i, end - answer_tokens : end] = input_ids[i, end - answer_tokens : end]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(len(samples), 3, 32, 32, generator=g),
    }
    if answer_tokens:
        batch["labels"] = labels
    return batch


def make_pruner(seed: int = 0, layers=(0, 1, 2), num_layers: int = 5, attn: str = "sdpa", **config):
    model = tiny_llava(tiny_llava_config(num_layers=num_layers, vocab_size=VOCAB), seed=seed, attn_implementation=attn)
    torch.manual_seed(seed + 1000)
    pruning = PruningConfig(
        layers=layers,
        train_ratios=config.pop("train_ratios", (0.5, 0.3, 0.1)[: len(layers)]),
        infer_ratios=config.pop("infer_ratios", (0.5, 0.3, 0.1)[: len(layers)]),
        num_heads=config.pop("num_heads", 4),
        **config,
    )
    return attach(model, pruning).eval()


def decisions_of(kept_vision: list[torch.Tensor], num_slots: int) -> list[torch.Tensor]:
    """Hard training decisions (B, num_slots) per stage that keep exactly what inference kept (``kept_vision``,
    each (B, k) with -1 on a sample's surplus slots)."""
    decisions = []
    for stage in kept_vision:
        keep = torch.zeros(stage.shape[0], num_slots)
        for i, kept in enumerate(stage):
            keep[i, kept[kept >= 0]] = 1.0
        decisions.append(keep)
    return decisions


def generate_alone(pruner, batch: dict[str, torch.Tensor], i: int, **kwargs) -> torch.Tensor:
    """Sample ``i`` of a left-padded batch generated on its own, its padding removed: (1, L_i + new)."""
    keep = batch["attention_mask"][i].bool()
    return pruner.generate(
        input_ids=batch["input_ids"][i : i + 1, keep],
        attention_mask=batch["attention_mask"][i : i + 1, keep],
        pixel_values=batch["pixel_values"][i : i + 1],
        **kwargs,
    )


@pytest.fixture
def pruner():
    return make_pruner()


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[torch.Size]:
    """The query shapes of every SDPA call from here on; eager attention (Llama's and CLIP's) patched to fail."""
    from transformers.models.clip import modeling_clip
    from transformers.models.llama import modeling_llama

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", no_eager)
    monkeypatch.setattr(modeling_clip, "eager_attention_forward", no_eager)
    return calls
