"""The vision-tower stage (layer -1) on Qwen2-VL and Qwen2.5-VL, tiny and random: the tower's attention rows,
un-permuted from Qwen2.5-VL's window order and recomputed per sample, against the attention weights HF's own eager
tower computes; VisionZip and VScan on merged tokens (the mean attention received instead of the CLS attention)
giving each image of a batch what it gets alone; the refusals that remain."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.vision_utils import get_vision_window_index

from lvpruning import PruningConfig, attach
from lvpruning.policies import POLICIES, PruningPolicy, get_policy
from lvpruning.qwen_vl import mean_received_attention
from lvpruning.stage import keep_count
from lvpruning.tiny import tiny_llava, tiny_qwen_vl_config
from tests.lvpruning.conftest import VOCAB
from tests.lvpruning.test_qwen_vl import alone, counts, make_qwen_batch

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# (t, h, w) patches: 30 vision tokens on a 6 x 5 merged grid (Qwen2.5-VL: 2 x 2 windows, partial ones at the
# bottom and right), 6 on 2 x 3, 20 on 4 x 5
GRIDS = [(1, 12, 10), (1, 4, 6), (1, 8, 10)]
MODELING = {"qwen2_vl": modeling_qwen2_vl, "qwen2_5_vl": modeling_qwen2_5_vl}
MERGED = [name for name in POLICIES if POLICIES[name].tower_merged]


def tower_pruner(family, seed=0, dtype=torch.float32, vision_layers=3, attn="sdpa"):
    config = tiny_qwen_vl_config(family, vocab_size=VOCAB, num_layers=5, vision_layers=vision_layers)
    model = tiny_llava(config, seed=seed, attn_implementation=attn).to(dtype)
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.5, 0.3, 0.1), infer_ratios=(0.5, 0.3, 0.1))
    return attach(model, pruning).to(dtype).eval()


def hf_tower_attention(family, pruner, batch, monkeypatch) -> list[torch.Tensor]:
    """Per block, HF's eager attention weights over all the batch's patches (sum P, h_v, ...) as a dense
    (h_v, P, P) in the order HF runs the blocks (window order on Qwen2.5-VL), 0 where the block computes nothing,
    captured from the eager attention function each window / image calls."""
    module = MODELING[family]
    calls = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        calls.append(weights[0])  # (h_v, n, n) one window or image
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        pruner.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    P = int(batch["image_grid_thw"].prod(-1).sum())
    blocks, dense, start = [], None, 0
    for weights in calls:
        if dense is None:
            dense, start = weights.new_zeros(weights.shape[0], P, P), 0
        n = weights.shape[-1]
        dense[:, start : start + n, start : start + n] = weights
        start += n
        if start == P:
            blocks.append(dense)
            dense = None
    return blocks


def run_order(pruner, grid) -> list[int]:
    """The patch HF's blocks see at each row (processor order), written out from ``window_index``."""
    if not type(pruner.model).__name__.startswith("Qwen2_5"):
        return list(range(int(grid.prod(-1).sum())))
    v = pruner.model.config.vision_config
    units, _ = get_vision_window_index(grid, 2, v.window_size, v.patch_size)
    return [4 * int(u) + i for u in units for i in range(4)]


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_tower_attention_is_hf_eager_attention_unpermuted_per_sample(family, monkeypatch):
    pruner = tower_pruner(family, attn="eager")
    batch = make_qwen_batch(pruner.model, GRIDS[:2], [(2, 3), (1, 2)], seed=1)
    expected = hf_tower_attention(family, pruner, batch, monkeypatch)
    with torch.no_grad():
        *_, tower = pruner.adapter.embed(
            batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], tower_states=True
        )
    order = run_order(pruner, batch["image_grid_thw"])
    patches = batch["image_grid_thw"].prod(-1).tolist()
    start = [0, patches[0]]
    depth = len(pruner.adapter.vision_blocks)
    assert len(expected) == depth and len(tower.states) == depth + 1
    windowed = 0
    for layer in range(depth):
        rows = tower.attention(layer)  # (B, h_v, P, P)
        for b, n in enumerate(patches):
            mine = torch.zeros(rows.shape[1], n, n)
            for i in range(len(order)):  # HF's row i is patch order[i]; keep this sample's rows only
                for j in range(len(order)):
                    if start[b] <= order[i] < start[b] + n and start[b] <= order[j] < start[b] + n:
                        mine[:, order[i] - start[b], order[j] - start[b]] = expected[layer][:, i, j]
            torch.testing.assert_close(rows[b, :, :n, :n], mine, atol=1e-5, rtol=1e-4)
            assert bool((rows[b, :, n:] == 0).all()) and bool((rows[b, :, :, n:] == 0).all())
        windowed += not pruner.adapter.full_attention(layer)
    assert windowed == (2 if family == "qwen2_5_vl" else 0)
    queries = torch.tensor([[5, 0, 100], [3, 23, 7]])  # rows chosen: the same as in the full matrix
    torch.testing.assert_close(
        tower.attention(0, queries),
        tower.attention(0).gather(2, queries[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[-1])),
    )


def test_mean_received_attention_is_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    B, H, P = 2, 3, 12
    attention = torch.rand(B, H, P, P, generator=g)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[1, 8:] = False
    attention[1, :, 8:] = 0
    attention[1, :, :, 8:] = 0
    out = mean_received_attention(attention, valid, 4)
    for b in range(B):
        n = int(valid[b].sum())
        for j in range(P // 4):
            total = 0.0
            for p in range(4 * j, 4 * j + 4):  # the vision token's 4 patches
                received = sum(float(attention[b, h, i, p]) for h in range(H) for i in range(n)) / (H * n)
                total += received
            if 4 * j < n:
                assert float(out[b, j]) == pytest.approx(total / 4, rel=1e-5)


def prune_kwargs(name):
    ratios = {"visionzip": (0.4,), "vscan": (0.4, 0.2)}[name]
    return {"policy": get_policy(name), "layers": POLICIES[name].published.on(5).layers, "keep_ratios": ratios}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MERGED)
def test_a_batch_of_images_of_different_sizes_gives_each_sample_what_it_gets_alone(family, name):
    pruner = tower_pruner(family, seed=2)
    batch = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[1], GRIDS[2]], [(2, 6), (4, 3), (1, 8)], seed=2)
    kwargs = prune_kwargs(name)
    with torch.no_grad():
        together = pruner(**batch, **kwargs)
        for i, n in enumerate(counts(batch)):
            single = pruner(**alone(batch, i), **kwargs)
            for stage, ratio in enumerate(kwargs["keep_ratios"]):
                k = keep_count(ratio, n)
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_keeps_the_tokens_ranked_first_by_hf_attention_received(family, monkeypatch):
    pruner = tower_pruner(family, seed=4, attn="eager")
    batch = alone(make_qwen_batch(pruner.model, GRIDS[:1], [(2, 3)], seed=4), 0)
    n = counts(batch)[0]  # 30: k = 3 keeps 3 dominant tokens (K = 0), k = 12 keeps 10 + 2 contextual
    last = hf_tower_attention(family, pruner, batch, monkeypatch)[-1]  # (h_v, P, P) in HF's order
    order = run_order(pruner, batch["image_grid_thw"])
    received = [0.0] * len(order)
    for i in range(len(order)):
        for j in range(len(order)):
            received[order[j]] += float(last[:, i, j].mean()) / len(order)  # over the heads and the queries
    s = torch.tensor([sum(received[4 * t : 4 * t + 4]) / 4 for t in range(n)])
    with torch.no_grad():
        out = pruner(**batch, policy=get_policy("visionzip"), layers=(-1,), keep_ratios=(0.1,))
        assert set(out.kept_vision[0][0].tolist()) == set(s.topk(3).indices.tolist())
        out = pruner(**batch, policy=get_policy("visionzip"), layers=(-1,), keep_ratios=(0.4,))
        kept = out.kept_vision[0][0].tolist()
        assert len(kept) == 12 and set(s.topk(10).indices.tolist()) <= set(kept)


@pytest.mark.parametrize("family", FAMILIES)
def test_vflowopt_and_ptp_are_refused_by_name_before_model_work(family, monkeypatch):
    pruner = tower_pruner(family)
    batch = make_qwen_batch(pruner.model, GRIDS[1:2], [(1, 2)])

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(pruner.adapter, "embed", no_model_work)
    name = type(pruner.model).__name__
    refused = {n for n in POLICIES if POLICIES[n].tower_stage and not POLICIES[n].tower_free} - set(MERGED)
    assert refused == {"vflowopt", "ptp"}
    with pytest.raises(ValueError, match=rf"vflowopt's vision-tower stage \(layer -1\) .* {name}'s vision tower"):
        pruner(**batch, policy=get_policy("vflowopt"), layers=(-1, 1, 2), keep_ratios=(0.5, 0.5, 0.3))
    with pytest.raises(ValueError, match=rf"ptp's vision-tower stage \(layer -1\) .* {name}'s vision tower"):
        pruner(**batch, policy=get_policy("ptp"), layers=(-1, 1), keep_ratios=(1.0, 0.25))


@pytest.mark.parametrize("name", MERGED)
def test_bf16_tower_stage_runs_and_keeps_each_samples_own_share(name):
    pruner = tower_pruner("qwen2_5_vl", seed=5, dtype=torch.bfloat16)
    batch = make_qwen_batch(pruner.model, GRIDS[:2], [(2, 5), (3, 4)], seed=5)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    kwargs = prune_kwargs(name)
    with torch.no_grad():
        out = pruner(**batch, **kwargs)
        *_, tower = pruner.adapter.embed(
            batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], tower_states=True
        )
    assert out.logits.dtype == torch.bfloat16 and bool(out.logits.isfinite().all())
    for i, n in enumerate(counts(batch)):
        assert out.keep_fractions[i, -1] == pytest.approx(keep_count(kwargs["keep_ratios"][-1], n) / n)
    rows = tower.attention(0)
    assert rows.dtype == torch.float32  # recomputed in fp32 from the bf16 states
    n = int(tower.valid()[1].sum())  # the smaller image's patches: rows of 1 there, of 0 beyond
    torch.testing.assert_close(rows[1, :, :n].sum(-1), torch.ones(rows.shape[1], n))
    assert bool((rows[1, :, n:] == 0).all())
    generated = pruner.generate(**batch, **kwargs, max_new_tokens=2, eos_token_id=[])
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)


class Recording(PruningPolicy):
    """Wraps a policy; keeps what ``plan`` returned at the vision-tower stage: kept vision indices and hidden."""

    name, tower_stage, tower_merged, per_sample_budgets = "recording", True, True, True

    def __init__(self, inner: PruningPolicy):
        self.inner, self.plans = inner, []

    def check_layers(self, layers):
        self.inner.check_layers(layers)

    def plan(self, stage, k):
        plan = self.inner.plan(stage, k)
        self.plans.append((stage.vision_index.gather(1, plan.keep), plan.hidden))
        return plan


def visionzip_reference(family, model, single, k) -> dict[int, torch.Tensor]:
    """VisionZip on Qwen-VL written out for one image, in float64 on HF's eager tower: the last block's attention
    (captured from the eager function), its rotated keys (its ``qkv`` output and HF's own rotary function on the
    rotary it is given) and the merger's input, placed back in the processor's order by a loop over
    ``window_index``; then the rule token by token. Returns {vision token: its embedding}."""
    module = MODELING[family]
    grid = single["image_grid_thw"]
    block, merger = model.model.visual.blocks[-1], model.model.visual.merger
    seen = {}
    hooks = [
        block.attn.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out)),
        block.attn.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]), with_kwargs=True
        ),
        merger.register_forward_pre_hook(lambda m, a: seen.__setitem__("merger_in", a[0])),
    ]
    calls = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        calls.append(weights[0])
        return out, weights

    module.eager_attention_forward = recording
    try:
        with torch.no_grad():
            image = model.model.get_image_features(single["pixel_values"].double(), grid, return_dict=True)
    finally:
        module.eager_attention_forward = original
        for hook in hooks:
            hook.remove()
    P = int(grid.prod())
    order = list(range(P))  # HF's row i is patch order[i]
    if family == "qwen2_5_vl":
        v = model.config.vision_config
        order = [
            4 * int(u) + i for u in get_vision_window_index(grid, 2, v.window_size, v.patch_size)[0] for i in range(4)
        ]
    heads = block.attn.num_heads
    attention = calls[-1]  # the last block attends over the whole image: one call
    cos, sin = seen["rope"]
    q, key, _ = seen["qkv"].view(P, 3, heads, -1).unbind(1)
    _, key = module.apply_rotary_pos_emb_vision(q, key, cos, sin)  # (P, h_v, d_v) in HF's order
    received, keys, features = [0.0] * P, [None] * P, [None] * P
    for i in range(P):
        keys[order[i]] = key[i].mean(dim=0)
        features[order[i]] = seen["merger_in"][i]
        for j in range(P):
            received[order[j]] += float(attention[:, i, j].mean()) / P
    n = P // 4
    s = [sum(received[4 * t : 4 * t + 4]) / 4 for t in range(n)]
    token_key = [sum(keys[4 * t : 4 * t + 4]) / 4 for t in range(n)]
    token_features = [torch.cat(features[4 * t : 4 * t + 4]) for t in range(n)]
    K = min(k - 1, round(k * 10 / 64))
    dominant = sorted(range(n), key=lambda t: s[t], reverse=True)[: k - K]
    out = {t: image.pooler_output[0][t] for t in dominant}
    remaining = [t for t in range(n) if t not in dominant]
    targets = remaining[:: max(1, len(remaining) // K)][:K]
    members = {c: [] for c in targets}
    for t in remaining:
        if t not in targets:
            cosine = [torch.nn.functional.cosine_similarity(token_key[t], token_key[c], dim=0) for c in targets]
            members[targets[max(range(K), key=lambda c: cosine[c])]].append(t)
    for c in targets:
        mean = sum(token_features[t] for t in members[c]) / max(1, len(members[c]))
        with torch.no_grad():
            out[c] = merger((token_features[c] + mean).view(4, -1))[0]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_matches_the_literal_formula_per_image_of_a_batch(family):
    pruner = tower_pruner(family, seed=6)
    batch = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[2]], [(2, 5), (1, 3)], seed=6)
    rec = Recording(get_policy("visionzip"))
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=(-1,), keep_ratios=(0.5,))
    eager = tower_pruner(family, seed=6, attn="eager").model.double()
    keep, hidden = rec.plans[0]
    for b, n in enumerate(counts(batch)):
        k = keep_count(0.5, n)  # 15 = 13 + 2 contextual, 10 = 8 + 2
        expected = visionzip_reference(family, eager, alone(batch, b), k)
        got = dict(zip(keep[b, :k].tolist(), hidden[b, :k].double()))
        assert set(got) == set(expected)
        for t in expected:
            torch.testing.assert_close(got[t], expected[t], rtol=1e-4, atol=1e-5)
