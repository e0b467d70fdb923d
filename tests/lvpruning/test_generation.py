"""Pruned generation against a cache-free reference, in padded batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from lvpruning.policies import get_policy
from tests.lvpruning.conftest import generate_alone, make_batch, make_pruner

RATIOS = (0.5, 0.3, 0.1)


def reference_generate(pruner, batch, steps, keep_ratios=RATIOS, **prune):
    """Re-run the pruned forward on the whole growing sequence, without a cache, and take the argmax.

    The instruction tokens stay those of the prompt, since generation prunes once, in the prefill."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    instruction = mask.bool() & (ids != 4)
    for _ in range(steps):
        out = pruner(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=batch["pixel_values"],
            instruction_mask=instruction,
            keep_ratios=keep_ratios,
            **prune,
        )
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
        instruction = torch.cat([instruction, torch.zeros_like(next_token, dtype=torch.bool)], 1)
    return ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_generation_matches_full_recompute(seed):
    pruner = make_pruner(seed)
    batch = make_batch([(3, 6), (1, 11)], seed=seed)
    with torch.no_grad():
        expected = reference_generate(pruner, batch, steps=6)
    generated = pruner.generate(**batch, keep_ratios=RATIOS, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", ["random", "fastv", "transprune", "adaptinfer", "star"])
def test_cached_generation_matches_full_recompute_for_every_method(name):
    pruner = make_pruner(5)
    batch = make_batch([(3, 6), (1, 11)], seed=5)
    policy = get_policy(name, seed=2)
    with torch.no_grad():
        expected = reference_generate(pruner, batch, steps=5, policy=policy)
    generated = pruner.generate(**batch, keep_ratios=RATIOS, policy=policy, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(generated, expected)


def test_padded_batch_generates_what_each_prompt_generates_alone():
    pruner = make_pruner(3)
    shapes = [(2, 9), (5, 3), (1, 1)]
    batch = make_batch(shapes, seed=3)
    together = pruner.generate(**batch, max_new_tokens=5, eos_token_id=[])
    for i in range(len(shapes)):
        alone = generate_alone(pruner, batch, i, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(together[i, -5:], alone[0, -5:])


def test_generation_stops_at_eos_and_pads_finished_samples():
    pruner = make_pruner(4)
    batch = make_batch([(2, 4), (3, 6)], seed=4)
    free = pruner.generate(**batch, max_new_tokens=4, eos_token_id=[])
    eos = int(free[0, -4])  # make sample 0's first new token the EOS
    out = pruner.generate(**batch, max_new_tokens=4, eos_token_id=eos, pad_token_id=3)
    assert out[0, -4] == eos and (out[0, -3:] == 3).all()
    first_eos = (free[1, -4:] == eos).nonzero()
    stop = int(first_eos[0]) + 1 if len(first_eos) else 4
    assert torch.equal(out[1, -4 : -4 + stop], free[1, -4 : -4 + stop])


def test_generate_requires_left_padding_and_eval_mode():
    pruner = make_pruner()
    batch = make_batch([(2, 4), (3, 6)], padding_side="right")
    with pytest.raises(ValueError, match="left"):
        pruner.generate(**batch)
    with pytest.raises(RuntimeError, match="eval"):
        pruner.train().generate(**make_batch([(2, 4)]))


def step_logits(pruner, batch, generated, keep_ratios=RATIOS):
    """The logits each new token of ``generated`` was chosen from, recomputed without a cache: step ``t``'s from the
    pruned forward over the prompt and the first ``t`` new tokens (as ``reference_generate``). (B, new, V)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    N = ids.shape[1]
    instruction = mask.bool() & (ids != 4)
    steps = []
    for t in range(generated.shape[1] - N):
        new = generated[:, N : N + t]
        out = pruner(
            input_ids=generated[:, : N + t],
            attention_mask=torch.cat([mask, torch.ones_like(new)], 1),
            pixel_values=batch["pixel_values"],
            instruction_mask=torch.cat([instruction, torch.zeros_like(new, dtype=torch.bool)], 1),
            keep_ratios=keep_ratios,
        )
        steps.append(out.logits[:, -1].float())
    return torch.stack(steps, 1)


def test_sampling_replays_its_seed_and_draws_only_among_the_top_k():
    pruner = make_pruner(6)
    batch = make_batch([(2, 4), (3, 6), (1, 9)], seed=6)
    N, new, k = batch["input_ids"].shape[1], 4, 3

    def sample(seed: int, **kwargs) -> torch.Tensor:
        torch.manual_seed(seed)
        common = {"keep_ratios": RATIOS, "max_new_tokens": new, "eos_token_id": []}
        return pruner.generate(**batch, do_sample=True, **common, **kwargs)

    draws = [sample(seed, top_k=k, temperature=1.5) for seed in range(12)]
    for seed in (0, 7):  # the same seed draws the same tokens ...
        assert torch.equal(sample(seed, top_k=k, temperature=1.5), draws[seed])
    for i, j in itertools.combinations(range(len(draws)), 2):  # ... and another seed other ones
        assert not torch.equal(draws[i][:, N:], draws[j][:, N:]), (i, j)

    with torch.no_grad():
        for tokens in draws:
            logits = step_logits(pruner, batch, tokens)  # (B, new, V)
            drawn = logits.gather(-1, tokens[:, N:, None])
            more_likely = (logits > drawn + 1e-5).sum(-1)  # tokens clearly above the drawn one at its step
            assert (more_likely < k).all(), more_likely  # every draw is among that step's k most likely
        first_top_k = step_logits(pruner, batch, draws[0][:, : N + 1]).squeeze(1).topk(k).indices  # (B, k)
    for b in range(len(first_top_k)):  # the first new token follows the same prompt in every draw
        first = {int(tokens[b, N]) for tokens in draws}
        assert first <= set(first_top_k[b].tolist()) and len(first) > 1, (b, first)  # top_k=3 is not top-1

    torch.manual_seed(0)
    a = pruner.generate(**batch, do_sample=True, top_k=1, temperature=0.7, max_new_tokens=4, eos_token_id=[])
    greedy = pruner.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(a, greedy)  # top-1 sampling is greedy
