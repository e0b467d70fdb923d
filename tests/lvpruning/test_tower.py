"""The vision-tower stage and merging: the same batching, padding, caching and attention rules as removal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lvpruning.config import PruningConfig, check_schedule
from lvpruning.flops import analytic_flops, measure_flops
from lvpruning.merging import group_sum, nearest
from lvpruning.policies import POLICIES, VFlowOptPolicy, get_policy, scaled_layers
from lvpruning.tiny import tiny_llava_config
from tests.lvpruning.conftest import generate_alone, make_batch, make_pruner
from tests.lvpruning.test_generation import reference_generate

# each tower method at its published schedule mapped on the 5-layer tiny decoder, with budgets of 64 patches
# that exercise the local windows (VScan), contextual tokens (VisionZip) and recycling cells (VFlowOpt)
SETTINGS = {
    "visionzip": ((-1,), (0.25,)),
    "vscan": ((-1, 1), (0.5, 0.125)),
    "vflowopt": ((-1, 0, 2), (0.3, 0.3, 0.15)),
    "star": ((-1, 1), (0.5, 0.25)),
    "ptp": ((-1, 0), (1.0, 0.25)),
}
TOWER_METHODS = [name for name in POLICIES if POLICIES[name].published.layers[0] == -1]


def tower_policy(name: str):
    """VFlowOpt with the entropy term on and a threshold that finds global tokens in a 65-token tower."""
    return VFlowOptPolicy(t=2.0, alpha=0.5) if name == "vflowopt" else get_policy(name)


def test_the_tower_methods_are_those_set_here():
    assert sorted(TOWER_METHODS) == sorted(SETTINGS)
    for name, (layers, _) in SETTINGS.items():
        assert POLICIES[name].published.on(5).layers == layers


@pytest.mark.parametrize("name", TOWER_METHODS)
def test_tower_methods_prune_a_padded_batch_as_each_sample_alone(name):
    pruner = make_pruner(layers=(0, 1, 2))
    layers, ratios = SETTINGS[name]
    batch = make_batch([(2, 4), (3, 7), (1, 2)], seed=2)
    policy = tower_policy(name)
    with torch.no_grad():
        together = pruner(**batch, policy=policy, layers=layers, keep_ratios=ratios)
        for i in range(3):
            keep = batch["attention_mask"][i].bool()
            alone = {k: batch[k][i : i + 1, keep] for k in ("input_ids", "attention_mask")}
            alone["pixel_values"] = batch["pixel_values"][i : i + 1]
            single = pruner(**alone, policy=policy, layers=layers, keep_ratios=ratios)
            for stage in range(len(layers)):
                assert torch.equal(single.kept_vision[stage][0], together.kept_vision[stage][i])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TOWER_METHODS)
def test_tower_methods_generate_for_a_padded_batch_what_each_sample_generates_alone(name):
    pruner = make_pruner(6, layers=(0, 1, 2))
    layers, ratios = SETTINGS[name]
    batch = make_batch([(2, 8), (4, 3), (1, 1)], seed=6)
    kwargs = {"policy": tower_policy(name), "layers": layers, "keep_ratios": ratios}
    together = pruner.generate(**batch, **kwargs, max_new_tokens=4, eos_token_id=[])
    for i in range(3):
        alone = generate_alone(pruner, batch, i, **kwargs, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(together[i, -4:], alone[0, -4:])


@pytest.mark.parametrize("name", TOWER_METHODS)
def test_tower_methods_cached_generation_matches_full_recompute(name):
    pruner = make_pruner(5)
    layers, ratios = SETTINGS[name]
    batch = make_batch([(3, 6), (1, 11)], seed=5)
    policy = tower_policy(name)
    with torch.no_grad():
        expected = reference_generate(pruner, batch, 5, keep_ratios=ratios, policy=policy, layers=layers)
    generated = pruner.generate(
        **batch, keep_ratios=ratios, policy=policy, layers=layers, max_new_tokens=5, eos_token_id=[]
    )
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", TOWER_METHODS)
def test_tower_methods_keep_sdpa_on_in_the_llm_and_the_tower(name, sdpa_calls):
    pruner = make_pruner(layers=(0, 1, 2))
    calls = sdpa_calls
    layers, ratios = SETTINGS[name]
    batch = make_batch([(2, 4), (3, 6)], seed=1)
    pruner.generate(**batch, policy=tower_policy(name), layers=layers, keep_ratios=ratios, max_new_tokens=3)
    text, vision = pruner.model.config.text_config, pruner.model.config.vision_config
    tower = sum(shape[2] == 65 for shape in calls)  # (B, h, 1 + 64 patches, d)
    assert tower == vision.num_hidden_layers
    assert sum(shape[2] == 1 for shape in calls) == 2 * text.num_hidden_layers  # two cached decoding steps
    assert text._attn_implementation == "sdpa" and vision._attn_implementation == "sdpa"


def test_merging_primitives_against_loops():
    g = torch.Generator().manual_seed(0)
    x, candidates = torch.randn(3, 11, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    weights = torch.rand(3, 11, generator=g)
    groups = torch.randint(-1, 4, (3, 11), generator=g)
    join = nearest(x, candidates)
    sums, totals = group_sum(x, groups, 4, weights)
    for b in range(3):
        for i in range(11):
            cosine = [torch.nn.functional.cosine_similarity(x[b, i], c, dim=0) for c in candidates[b]]
            assert join[b, i] == max(range(4), key=lambda c: cosine[c])
        for c in range(4):
            members = [i for i in range(11) if groups[b, i] == c]
            expected = sum((weights[b, i] * x[b, i] for i in members), torch.zeros(5))
            torch.testing.assert_close(sums[b, c], expected)
            torch.testing.assert_close(totals[b, c], sum((weights[b, i] for i in members), torch.tensor(0.0)))


def test_the_tower_stage_is_layer_minus_one_and_comes_first():
    check_schedule((-1, 3), (0.5, 0.25), 5)
    for layers in [(0, -1), (-2, 1), (-1, -1)]:
        with pytest.raises(ValueError, match="pruning layers"):
            check_schedule(layers, (0.5, 0.25), 5)
    assert scaled_layers((-1, 15), 4) == (-1, 1)
    assert scaled_layers((-1, 8, 17), 4) == (-1, 0, 1)


def test_methods_that_need_the_tower_or_a_decoder_layer_say_so():
    pruner = make_pruner(layers=(0, 1, 2))
    batch = make_batch([(2, 4)], seed=3)
    with torch.no_grad(), pytest.raises(ValueError, match="vision tower only"):
        pruner(**batch, policy=get_policy("visionzip"), layers=(0,), keep_ratios=(0.5,))
    with torch.no_grad(), pytest.raises(ValueError, match="start at -1"):
        pruner(**batch, policy=get_policy("vflowopt"), layers=(0, 1), keep_ratios=(0.5, 0.3))
    with torch.no_grad(), pytest.raises(ValueError, match="cannot prune at the vision tower"):
        pruner(**batch, policy=get_policy("fastv"), layers=(-1, 1), keep_ratios=(0.5, 0.3))
    with torch.no_grad():  # a method that needs no attention prunes at the tower too
        out = pruner(**batch, policy=get_policy("random"), layers=(-1, 1), keep_ratios=(0.5, 0.3))
    assert [k.shape[1] for k in out.kept_vision] == [32, 19]


@pytest.mark.parametrize("name", TOWER_METHODS)
def test_tower_methods_overhead_is_exactly_the_measured_difference(name):
    """Analytic = measured on meta, and the ``policy`` part alone equals what the method adds to the count of a
    plain removal (random) at the same schedule: the CLS-attention recompute, keys, merging and projections."""
    config = tiny_llava_config(num_kv_heads=2, num_layers=5)
    layers, ratios = SETTINGS[name]
    pruning = PruningConfig(layers=(0, 1, 2))  # the decision modules' shape, unused by these methods
    report = analytic_flops(config, pruning, ratios, 12, method=name, layers=layers)
    measured = measure_flops(config, pruning, ratios, 12, method=name, layers=layers)
    plain = measure_flops(config, pruning, ratios, 12, method="random", layers=layers)
    assert measured == report.pruned
    assert measured - plain == report.pruned_parts["policy"] > 0


def test_vflowopt_recycles_every_filled_cell_when_a_cell_is_kept_whole():
    """9 cells of 3 x 3 patches on the 8 x 8 grid; cell 8 (patches 54, 55, 62, 63) scores highest and is kept
    directly, so no pruned patch is in it: every other cell still gives its best pruned patch's slot."""

    class Fixed(VFlowOptPolicy):
        def importance(self, stage):
            return scores

    scores = torch.linspace(0.5, 0.01, 64)[None].clone()
    scores[0, [54, 55, 62, 63]], scores[0, 20] = 10.0, 9.0
    stage = SimpleNamespace(layer=-1, vision_pos=torch.arange(64)[None], hidden_out=torch.randn(1, 64, 8))
    policy = Fixed(cell=9.0)
    cell, num_cells = policy.cells(64)
    plan = policy.plan(stage, 13)
    direct = [54, 55, 62, 63, 20]  # D = 13 - 8 filled cells
    pruned = [j for j in range(64) if j not in direct]
    filled = [c for c in range(num_cells) if any(cell[j] == c for j in pruned)]
    best = {c: max((j for j in pruned if cell[j] == c), key=lambda j: scores[0, j]) for c in filled}
    assert len(best) == 8 and best[0] == 0
    assert sorted(plan.keep[0].tolist()) == sorted(direct + list(best.values()))
    for c, j in best.items():  # each slot holds its cell's s-weighted mean
        members = [i for i in pruned if cell[i] == c]
        w = scores[0, members]
        expected = (w[:, None] * stage.hidden_out[0, members]).sum(0) / w.sum()
        torch.testing.assert_close(plan.hidden[0, plan.keep[0].tolist().index(j)], expected)
