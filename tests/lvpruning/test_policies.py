"""Training-free policies through the same engine: FastV against eager attention maps, random is seeded."""

from __future__ import annotations

import pytest
import torch

from lvpruning.engine import keep_count
from lvpruning.policies import FastVPolicy, RandomPolicy, get_policy
from tests.lvpruning.conftest import NUM_VISION, make_batch, make_pruner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fastv_keeps_the_tokens_eager_attention_ranks_highest(seed):
    """Reference: HF's eager attention maps (output_attentions) of layer K, last token, mean over heads."""
    pruner = make_pruner(seed, layers=(1,), attn="eager", infer_ratios=(0.25,))
    batch = make_batch([(3, 6), (1, 9)], seed=seed)  # left padded: the last token is the last instruction token
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        maps = pruner.model(**batch, position_ids=position_ids, output_attentions=True).attentions[1]
        out = pruner(**batch, policy=FastVPolicy())
    vision = batch["input_ids"] == 4
    last_row = maps[:, :, -1, :].mean(1)  # (B, N)
    k = keep_count(0.25, NUM_VISION)
    for b in range(2):
        expected = last_row[b][vision[b]].topk(k).indices.sort().values
        assert torch.equal(out.kept_vision[0][b], expected)


def test_random_policy_is_seeded_and_differs_from_learned():
    pruner = make_pruner()
    batch = make_batch([(2, 4), (2, 4)])
    with torch.no_grad():
        a = pruner(**batch, policy=RandomPolicy(3)).kept_vision
        b = pruner(**batch, policy=RandomPolicy(3)).kept_vision
        c = pruner(**batch, policy=get_policy("lvpruning")).kept_vision
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="unknown pruning policy"):
        get_policy("topk")
