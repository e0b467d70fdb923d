"""Every policy through the same engine: FastV against eager attention maps, random seeded per sample, padding
invariance, SDPA kept, the sub-block recording of ``recorded_layer``, and no positional bias in STAR's first stage.
The other methods' formulas are checked in ``test_references.py`` and ``test_tower_references.py``."""

from __future__ import annotations

import math

import pytest
import torch

from lvpruning.policies import POLICIES, FastVPolicy, RandomPolicy, StarPolicy, get_policy
from lvpruning.stage import StageInput, gather_tokens, keep_count
from tests.lvpruning.conftest import NUM_VISION, generate_alone, make_batch, make_pruner

# the methods that prune in the LLM only (the vision-tower methods: test_tower.py)
LLM_METHODS = [name for name in POLICIES if POLICIES[name].published.layers[0] >= 0]
TRAINING_FREE = [name for name in LLM_METHODS if name != "lvpruning"]


def fastv_reference(seed: int, batch: dict, query: int = -1) -> list[torch.Tensor]:
    """HF's eager attention maps (output_attentions) of layer K = 1 of the same weights, the row of the ``query``
    token (-1: the last, the last instruction token under left padding), mean over heads; each sample's top-k
    vision tokens, sorted."""
    eager = make_pruner(seed, layers=(1,), attn="eager", infer_ratios=(0.25,))
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        maps = eager.model(**batch, position_ids=position_ids, output_attentions=True).attentions[1]
    vision = batch["input_ids"] == 4
    row = maps[:, :, query, :].mean(1)  # (B, N)
    k = keep_count(0.25, NUM_VISION)
    return [row[b][vision[b]].topk(k).indices.sort().values for b in range(row.shape[0])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fastv_keeps_the_tokens_eager_attention_ranks_highest(seed):
    """The engine on SDPA (its attention row recomputed) against HF's eager maps; the row of the token before the
    last (a mutation) fails."""
    pruner = make_pruner(seed, layers=(1,), infer_ratios=(0.25,))
    assert pruner.model.config.text_config._attn_implementation == "sdpa"
    batch = make_batch([(3, 6), (1, 9)], seed=seed)  # left padded: the last token is the last instruction token
    with torch.no_grad():
        out = pruner(**batch, policy=FastVPolicy())
    for b, expected in enumerate(fastv_reference(seed, batch)):
        assert torch.equal(out.kept_vision[0][b], expected)
    wrong = fastv_reference(seed, batch, query=-2)
    assert not all(torch.equal(out.kept_vision[0][b], wrong[b]) for b in range(2))


def test_random_policy_is_seeded_and_differs_from_learned():
    pruner = make_pruner()
    batch = make_batch([(2, 4), (2, 4)])
    with torch.no_grad():
        a = pruner(**batch, policy=RandomPolicy(3)).kept_vision
        b = pruner(**batch, policy=RandomPolicy(3)).kept_vision
        c = pruner(**batch, policy=get_policy("lvpruning", decision_modules=pruner.decision_modules)).kept_vision
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="unknown pruning policy"):
        get_policy("topk")
    with pytest.raises(ValueError, match="decision_modules"):
        get_policy("lvpruning")


def test_random_policy_keeps_the_same_tokens_alone_and_in_any_batch():
    """Issue 16: seeded per sample, so batch size and position do not change a sample's tokens."""
    pruner = make_pruner()
    batch = make_batch([(2, 4), (3, 6), (1, 9)], seed=5)
    with torch.no_grad():
        together = pruner(**batch, policy=RandomPolicy(7)).kept_vision
        flipped = {k: v.flip(0) for k, v in batch.items()}
        reversed_order = pruner(**flipped, policy=RandomPolicy(7)).kept_vision
        for i in range(3):
            keep = batch["attention_mask"][i].bool()
            alone = {k: batch[k][i : i + 1, keep] for k in ("input_ids", "attention_mask")}
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
            single = pruner(**alone, policy=RandomPolicy(7)).kept_vision
            for stage in range(3):
                assert torch.equal(single[stage][0], together[stage][i])
                assert torch.equal(reversed_order[stage][2 - i], together[stage][i])


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_every_method_prunes_a_padded_batch_as_each_sample_alone(name):
    pruner = make_pruner(layers=(0, 1, 2))
    batch = make_batch([(2, 4), (3, 7)], seed=2)
    policy = get_policy(name, seed=1)
    with torch.no_grad():
        together = pruner(**batch, policy=policy)
        for i in range(2):
            keep = batch["attention_mask"][i].bool()
            alone = {k: batch[k][i : i + 1, keep] for k in ("input_ids", "attention_mask")}
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
            single = pruner(**alone, policy=policy)
            for stage in range(3):
                assert torch.equal(single.kept_vision[stage][0], together.kept_vision[stage][i])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", LLM_METHODS)
def test_every_method_generates_for_a_padded_batch_what_each_sample_generates_alone(name):
    pruner = make_pruner(6, layers=(0, 1, 2))
    batch = make_batch([(2, 8), (4, 3), (1, 1)], seed=6)
    policy = get_policy(name, seed=3, decision_modules=pruner.decision_modules)
    together = pruner.generate(**batch, policy=policy, max_new_tokens=4, eos_token_id=[])
    for i in range(3):
        alone = generate_alone(pruner, batch, i, policy=policy, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(together[i, -4:], alone[0, -4:])


@pytest.mark.parametrize("name", LLM_METHODS)
def test_every_method_keeps_sdpa_on(name, sdpa_calls):
    """No switch to eager: every decoder attention call goes through SDPA, in the prefill and in decoding."""
    pruner = make_pruner(layers=(0, 1, 2))
    calls = sdpa_calls
    batch = make_batch([(2, 4), (3, 6)], seed=1)
    policy = get_policy(name, decision_modules=pruner.decision_modules)
    pruner.generate(**batch, policy=policy, max_new_tokens=3, eos_token_id=[])
    num_layers = pruner.adapter.text_config.num_hidden_layers
    assert sum(shape[2] > 1 for shape in calls) >= num_layers  # the prefill's decoder layers (plus the ViT's)
    assert sum(shape[2] == 1 for shape in calls) == 2 * num_layers  # two cached decoding steps
    assert pruner.model.config.text_config._attn_implementation == "sdpa"


def test_recorded_layer_is_the_decoder_layer():
    """The sub-block-by-sub-block run that records TTV's inputs returns exactly what the layer itself returns."""
    pruner = make_pruner(layers=(0, 1, 2))
    hidden = torch.randn(2, 9, pruner.adapter.text_config.hidden_size)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, :3] = False
    position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {
        "attention_mask": pruner.adapter.attention_mask(padding, 9, hidden.dtype),
        "position_embeddings": pruner.adapter.rotary(hidden, position_ids),
        "position_ids": position_ids,
    }
    layer = pruner.adapter.layers[2]
    with torch.no_grad():
        expected = layer(hidden, **kwargs)
        out, parts = pruner.adapter.recorded_layer(2, hidden, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(parts["attn_in"], layer.input_layernorm(hidden))
        residual = hidden + parts["attn_out"]
        torch.testing.assert_close(parts["mlp_out"], layer.mlp(layer.post_attention_layernorm(residual)))
        torch.testing.assert_close(out, residual + parts["mlp_out"])


class CausalStar(StarPolicy):
    """The mutation: STAR's early score under a causal mask, so that a token receives attention only from itself and
    the tokens after it (as when it was read from decoder layer 1's attention)."""

    def scores(self, stage: StageInput) -> torch.Tensor:
        if stage.layer != -1:
            return super().scores(stage)
        h = gather_tokens(stage.hidden_in, stage.vision_pos).float()  # (B, V, C)
        logits = h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
        return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=1)


def mean_raster_index(policy, layers, ratios) -> float:
    """The mean raster index, as a fraction of the grid, of the vision tokens kept at the first stage: 4 random tiny
    models x 8 random images and prompts (no positional structure: about 0.5 for a method without a bias)."""
    means = []
    for seed in range(4):
        pruner = make_pruner(seed, layers=(0, 1, 2))
        batch = make_batch([(3, 6)] * 8, seed=seed)
        with torch.no_grad():
            kept = pruner(**batch, policy=policy, layers=layers, keep_ratios=ratios).kept_vision[0]
        means.append(kept.float().mean() / (NUM_VISION - 1))
    return float(torch.stack(means).mean())


@pytest.mark.parametrize("policy, unbiased", [(StarPolicy(), True), (CausalStar(), False)])
def test_star_first_stage_keeps_no_corner_of_the_image(policy, unbiased):
    """Issue 30: STAR's visual self-attention is bidirectional; a causal one keeps the top left of the image."""
    mean = mean_raster_index(policy, (-1, 1), (0.5, 0.25))
    assert (abs(mean - 0.5) < 0.05) == unbiased, mean
