"""The vision-tower stage on LLaVA-NeXT's tiles: the tower's hidden states per tile against HF's own tower, VisionZip,
VScan and Random on batches of images of different sizes against each sample alone, and VisionZip and VScan against
slow, literal transcriptions of their reference code on each crop (float64, HF's eager attention), as their authors
ran LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch

from lvpruning import PruningConfig, attach
from lvpruning.policies import get_policy
from lvpruning.stage import keep_count
from lvpruning.tiny import tiny_llava, tiny_tiled_config
from tests.lvpruning.test_tiled import SIZES, alone, make_tiled_batch, vision_counts
from tests.lvpruning.test_tower_references import Recording, cos, project

# per method: (layers, keep ratios) on the 5-layer tiny decoder
SETTINGS = {
    "visionzip": ((-1,), (0.45,)),
    "vscan": ((-1, 1), (0.6, 0.2)),
    "random": ((-1, 1), (0.5, 0.2)),
    "star": ((-1, 1), (0.5, 0.2)),
}


class TiledRecording(Recording):
    """``Recording`` with the wrapped policy's tower-stage capabilities."""

    def __init__(self, inner):
        super().__init__(inner)
        self.name, self.tower_stage, self.tower_tiles = inner.name, inner.tower_stage, inner.tower_tiles
        self.tower_cls, self.per_sample_budgets = inner.tower_cls, inner.per_sample_budgets


def next_pruner(seed: int, tile_size: int = 16, vision_layers: int = 2, attn: str = "sdpa"):
    config = tiny_tiled_config("llava_next", "llama", num_layers=5, tile_size=tile_size)
    config.vision_config.num_hidden_layers = vision_layers
    model = tiny_llava(config, seed, attn)
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.5, 0.3, 0.1), infer_ratios=(0.5, 0.3, 0.1))
    return attach(model, pruning).eval()


def test_tower_states_per_tile_equal_hf_tower_on_each_real_tile():
    pruner = next_pruner(0)
    batch = make_tiled_batch(pruner.model, [SIZES[1], SIZES[0]], [(2, 3), (1, 4)], seed=0)  # 3 and 5 passes
    with torch.no_grad():
        *_, states = pruner.adapter.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], True)
        for b in range(2):
            pixels = alone(batch, b)["pixel_values"][0]  # (tiles, 3, S, S): the real tiles only
            expected = pruner.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            assert len(states) == len(expected)
            for got, want in zip(states, expected):
                torch.testing.assert_close(got[b, : pixels.shape[0]], want)
                assert bool((got[b, pixels.shape[0] :] == 0).all())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_batch_of_images_of_different_sizes_gives_each_sample_what_it_gets_alone(name):
    pruner = next_pruner(2)
    sizes = [SIZES[0], SIZES[1], SIZES[3]]
    batch = make_tiled_batch(pruner.model, sizes, [(2, 6), (4, 3), (1, 8)], seed=2)
    counts = vision_counts(pruner.model, sizes)
    layers, ratios = SETTINGS[name]
    policy = get_policy(name, seed=1) if name == "random" else get_policy(name)
    with torch.no_grad():
        together = pruner(**batch, policy=policy, layers=layers, keep_ratios=ratios)
        for i in range(3):
            single = pruner(**alone(batch, i), policy=policy, layers=layers, keep_ratios=ratios)
            for stage, ratio in enumerate(ratios):
                k = keep_count(ratio, counts[i])
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
                assert together.keep_fractions[i, stage] == pytest.approx(k / counts[i])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)
    new = pruner.generate(**batch, policy=policy, layers=layers, keep_ratios=ratios, max_new_tokens=3, eos_token_id=[])
    for i in range(3):
        single = pruner.generate(
            **alone(batch, i), policy=policy, layers=layers, keep_ratios=ratios, max_new_tokens=3, eos_token_id=[]
        )
        assert torch.equal(new[i, -3:], single[0, -3:])


# ------------------------------------------------------------------ literal references, one square image (2 x 2 grid)


def crop_pass(model, pixels):
    """One crop through HF's tower, float64, eager: attention maps (h, M, M), hidden states (M, C_v), head-mean keys
    (M, d) per layer (a hook on ``k_proj``)."""
    keys = []
    layers = model.model.vision_tower.encoder.layers
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out[0])) for layer in layers]
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixels[None].double(), output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    heads = out.attentions[0].shape[1]
    return (
        [a[0] for a in out.attentions],
        [h[0] for h in out.hidden_states],
        [k.view(k.shape[0], heads, -1).mean(1) for k in keys],
    )


def packed_slot(crop: int, j: int, side: int, grid: int = 2) -> int:
    """HF's packing of a square image (no letterbox): the base view's side^2 tokens, then the full-resolution grid
    row by row, each row closed by a newline. Crop 0 is the base view; tower token j (1..side^2)."""
    r, c = divmod(j - 1, side)
    if crop == 0:
        return r * side + c
    t = crop - 1
    row, col = (t // grid) * side + r, (t % grid) * side + c
    return side * side + row * (grid * side + 1) + col


def visionzip_crop(model, pixels, dominant_num, contextual_num):
    """``CLIPVisionTower_VisionZip.forward`` on one crop, as loops: CLS + the top ``dominant_num`` by the summed CLS
    attention of layer -2, the others' targets every ``len // contextual_num``, each other joining its most similar
    target (normalized head-mean keys), contextual = target + mean of its members. Tower token -> hidden (C_v)."""
    A, H, K = (x[-2] for x in crop_pass(model, pixels))
    M = H.shape[0]
    s = {j: sum(A[h, 0, j].item() for h in range(A.shape[0])) for j in range(1, M)}
    dominant = sorted(s, key=s.get, reverse=True)[:dominant_num]
    filtered = [j for j in range(1, M) if j not in dominant]
    step = max(1, len(filtered) // contextual_num)
    targets = filtered[::step][:contextual_num]
    members = {t: [] for t in targets}
    for i in filtered:
        if i not in targets:
            members[max(targets, key=lambda t: cos(K[i], K[t]))].append(i)
    out = {j: H[j] for j in dominant}
    contextual = {t: H[t] + (sum(H[i] for i in g) / len(g) if g else 0) for t, g in members.items()}
    return out, contextual, H[0]


def test_visionzip_keeps_what_the_reference_keeps_on_each_crop():
    """640 of 2,928 on LLaVA-NeXT-7B is 5 crops x (108 + 20); here 40 of 88 = 5 crops x (7 + 1): CLS + 6 dominant
    patches and 1 contextual token per crop (``visionzip(model, dominant=7, contextual=1)``). The reference drops
    the newlines; slots: a contextual token at its target's, the CLS token at its crop's first free one."""
    pruner, rec = next_pruner(3), TiledRecording(get_policy("visionzip"))
    batch = make_tiled_batch(pruner.model, [SIZES[0], SIZES[1]], [(2, 4), (3, 2)], seed=3)
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=(-1,), keep_ratios=(40 / 88,))
    eager = tiny_llava(pruner.model.config, 3, "eager").double()
    side = 4
    expected = {}
    for crop, pixels in enumerate(alone(batch, 0)["pixel_values"][0]):
        dominant, contextual, cls = visionzip_crop(eager, pixels, 6, 1)
        for j, h in (dominant | contextual).items():
            expected[packed_slot(crop, j, side)] = project(eager, h)
        free = min(j for j in range(1, side * side + 1) if j not in dominant and j not in contextual)
        expected[packed_slot(crop, free, side)] = project(eager, cls)
    keep, hidden, _ = rec.plans[0]
    kept = keep[0, :40].tolist()
    assert sorted(kept) == sorted(expected)
    got = dict(zip(kept, hidden[0, :40].double()))
    torch.testing.assert_close(
        torch.stack([got[j] for j in sorted(expected)]),
        torch.stack([expected[j] for j in sorted(expected)]),
        rtol=1e-4,
        atol=1e-5,
    )


def vscan_crop(model, pixels, visual_token_num, shallow, window_size):
    """``encode_images`` on one crop, as loops: the top ``visual_token_num // 2 // windows`` of each window by the
    head-mean CLS attention of layer ``shallow`` (5 of 24), the rest by layer -2's among the others, then
    ``token_merging`` of the projected features (each dropped token to its most cosine-similar kept one, averaged).
    Tower token -> merged projected feature."""
    A, H, _ = crop_pass(model, pixels)
    side = round((H[0].shape[0] - 1) ** 0.5)
    local_a = A[shallow].mean(0)[0]  # (M,)
    deep_a = A[-2].mean(0)[0]
    windows = side // window_size
    per_window = int(visual_token_num * 0.5) // (windows * windows)
    local = []
    for wi in range(windows):
        for wj in range(windows):
            cells = [
                1 + (wi * window_size + dy) * side + wj * window_size + dx
                for dy in range(window_size)
                for dx in range(window_size)
            ]
            local += sorted(cells, key=lambda j: local_a[j].item(), reverse=True)[:per_window]
    rest = sorted(
        (j for j in range(1, side * side + 1) if j not in local), key=lambda j: deep_a[j].item(), reverse=True
    )
    kept = local + rest[: visual_token_num - len(local)]
    x = {j: project(model, H[-2][j]) for j in range(1, side * side + 1)}
    members = {j: [] for j in kept}
    for i in x:
        if i not in kept:
            members[max(kept, key=lambda j: cos(x[i], x[j]))].append(i)
    return {j: (x[j] + sum((x[i] for i in g), torch.zeros_like(x[j]))) / (1 + len(g)) for j, g in members.items()}


def test_vscan_keeps_what_the_reference_keeps_on_each_crop():
    """The published NeXT setting is 96 per crop with every newline kept; here tiles of 8 x 8 patches (2 x 2
    windows of 4 x 4, as 6 x 6 of 24 x 24), 4 tower layers (shallow 0, feature 2), a 64 x 64 image: 336 tokens, of
    which 16 newlines + 5 crops x 40 (16 local, 24 global) = 216."""
    pruner, rec = next_pruner(4, tile_size=32, vision_layers=4), TiledRecording(get_policy("vscan"))
    batch = make_tiled_batch(pruner.model, [(64, 64)], [(2, 4)], seed=4)
    assert vision_counts(pruner.model, [(64, 64)]) == [336]
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=(-1,), keep_ratios=(216 / 336,))
    eager = tiny_llava(pruner.model.config, 4, "eager").double()
    side = 8
    expected = {}
    for crop, pixels in enumerate(alone(batch, 0)["pixel_values"][0]):
        for j, h in vscan_crop(eager, pixels, 40, 0, 2).items():
            expected[packed_slot(crop, j, side)] = h
    with torch.no_grad():
        embeds = pruner.adapter.embed(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])[0][0]
    vision = batch["input_ids"][0].eq(pruner.model.config.image_token_id).nonzero()[:, 0]
    for row in range(2 * side):  # the newline tokens, kept unchanged
        slot = side * side + row * (2 * side + 1) + 2 * side
        expected[slot] = embeds[vision[slot]].double()
    keep, hidden, _ = rec.plans[0]
    kept = keep[0].tolist()
    assert sorted(kept) == sorted(expected)
    got = dict(zip(kept, hidden[0].double()))
    torch.testing.assert_close(
        torch.stack([got[j] for j in sorted(expected)]),
        torch.stack([expected[j] for j in sorted(expected)]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_tower_methods_that_cannot_run_on_tiles_fail_before_model_work():
    pruner = next_pruner(5)
    batch = make_tiled_batch(pruner.model, [SIZES[0]], [(1, 2)])
    with pytest.raises(ValueError, match="vflowopt's vision-tower stage .* LLaVA-1.5 only"):
        pruner(**batch, policy=get_policy("vflowopt"), layers=(-1,), keep_ratios=(0.5,))
    onevision = tiny_llava(tiny_tiled_config("llava_onevision", "qwen2", num_layers=5), seed=5)
    ov = attach(onevision, PruningConfig(layers=(0,), train_ratios=(0.5,), infer_ratios=(0.5,), num_heads=4))
    ov_batch = make_tiled_batch(onevision, [SIZES[0], SIZES[1]], [(1, 2), (2, 3)])
    for name in ("visionzip", "vscan"):
        with pytest.raises(ValueError, match=f"{name} ranks by the tower's CLS attention; .* SigLIP"):
            ov(**ov_batch, policy=get_policy(name), layers=(-1,), keep_ratios=(0.5,))
    with torch.no_grad():  # Random reads no tower: it runs there
        out = ov(**ov_batch, policy=get_policy("random"), layers=(-1,), keep_ratios=(0.5,))
    counts = vision_counts(onevision, [SIZES[0], SIZES[1]])
    assert [int((k >= 0).sum()) for k in out.kept_vision[0]] == [keep_count(0.5, n) for n in counts]
