"""Pyramid Token Pruning against a slow, literal transcription of its formulas (our reading, docs/methods.md): on
LLaVA-NeXT's tiles (square and letterboxed images, each crop through HF's tower) and on LLaVA-1.5's single view,
float64 with HF's eager attention, each sample alone; a batch of images of different sizes against each sample
alone, in float32 and bf16; its region budgets by hand."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from lvpruning.policies import get_policy
from lvpruning.policies.ptp import PTPPolicy, region_budgets
from lvpruning.stage import keep_count
from lvpruning.tiny import tiny_llava
from tests.lvpruning.conftest import IMAGE_TOKEN
from tests.lvpruning.test_tiled import SIZES, alone, make_tiled_batch, vision_counts
from tests.lvpruning.test_tiled_tower import TiledRecording, crop_pass, next_pruner
from tests.lvpruning.test_tower_references import LENGTHS, P, build, run_engine, sample, tower_pass

SIDE = 4  # patches per side of a crop (tiles of 16 pixels, patches of 4)


class PlanRecording(TiledRecording):
    """Keeps per stage what ``plan`` returned: kept vision indices (B, max k), hidden, values."""

    def plan(self, stage, k):
        plan = self.inner.plan(stage, k)
        self.plans.append((stage.vision_index.gather(1, plan.keep), plan.hidden, plan.values))
        return plan


def sharpened(model, tower: float = 5.0, llm: float = 1.0):
    """``model`` with the queries and keys of its CLIP layers scaled by ``tower``, of its decoder layers by ``llm``:
    a random tiny model's attention is nearly uniform, so every tile would get an equal budget; sharper, the tiles'
    saliency differs (0.03 to 0.29 of the budget at 5)."""
    with torch.no_grad():
        for layers, factor in (
            (model.model.vision_tower.encoder.layers, tower),
            (model.model.language_model.layers, llm),
        ):
            for layer in layers:
                layer.self_attn.q_proj.weight.mul_(factor)
                layer.self_attn.k_proj.weight.mul_(factor)
    return model


def pruner_and_eager(seed: int, tower: float = 5.0, llm: float = 1.0):
    """The engine's tiny LLaVA-NeXT (4 CLIP layers, :func:`sharpened`) and the same weights in float64 with HF's
    eager attention."""
    pruner = next_pruner(seed, vision_layers=4)
    sharpened(pruner.model, tower, llm)
    return pruner, sharpened(tiny_llava(pruner.model.config, seed, "eager"), tower, llm).double()


def packed(config, image_size):
    """HF's packing of one image, by hand: ``slots`` {(crop, tower token j): vision slot} (crop 0 the base view,
    then the base view's 16, then the unpadded rows of the full-resolution grid, each closed by a newline), and for
    each tile token its cell (y, x) in the unpadded ``H x W`` grid (``unpad_image``: the letterbox rows or columns
    of a grid whose aspect differs from the image's are dropped)."""
    grid_h, grid_w = get_anyres_image_grid_shape(
        list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
    )
    full_h, full_w = grid_h * SIDE, grid_w * SIDE
    height, width = image_size
    rows, cols = range(full_h), range(full_w)
    if width / height > full_w / full_h:
        pad = (full_h - int(round(height * full_w / width, 7))) // 2
        rows = range(pad, full_h - pad)
    else:
        pad = (full_w - int(round(width * full_h / height, 7))) // 2
        cols = range(pad, full_w - pad)
    slots, cells, slot = {(0, j): j - 1 for j in range(1, SIDE * SIDE + 1)}, {}, SIDE * SIDE
    for y in rows:
        for x in cols:
            key = (1 + (y // SIDE) * grid_w + x // SIDE, 1 + (y % SIDE) * SIDE + x % SIDE)
            slots[key], cells[key] = slot, (y - rows[0], x - cols[0])
            slot += 1
        slot += 1  # the row's newline
    return slots, cells, len(rows), len(cols), rows[0], cols[0], full_h, full_w


def ptp_reference(model, sample, K, k, alpha=0.5, variant=""):
    """PTP on one image alone, as loops over the crops (0 the base view, 1 + t tile t). Returns the tower record
    {slot: w_p s_j} and the kept slots."""
    pixels = sample["pixel_values"][0]
    slots, cells, H, W, y0, x0, full_h, full_w = packed(model.config, sample["image_sizes"][0].tolist())
    if variant == "padded grid":  # the base view mapped onto the whole tile grid, letterbox included
        cells = {key: (y + y0, x + x0) for key, (y, x) in cells.items()}
        H, W = full_h, full_w
    a = {}  # (crop, tower token j) -> head-mean CLS attention of the feature layer
    for crop in range(pixels.shape[0]):
        A = crop_pass(model, pixels[crop])[0][-2]  # (h, M, M) the layer whose output LLaVA projects
        for j in range(1, SIDE * SIDE + 1):
            a[crop, j] = A[:, 0, j].mean().item()
    crops = sorted({c for c, _ in slots})  # those with tokens after the unpadding
    tokens = {c: [slots[c2, j] for c2, j in slots if c2 == c] for c in crops}
    saliency = {slot: a[c, j] / sum(a[c, i] for c2, i in slots if c2 == c) for (c, j), slot in slots.items()}
    R = dict.fromkeys(crops[1:], 0.0)  # each tile: the base view's attention over the cells showing its part
    for (c, _), (y, x) in cells.items():
        R[c] += a[0, 1 + (y * SIDE // H) * SIDE + x * SIDE // W]
    n = len(slots)
    w = {0: len(tokens[0]) / n} | {c: (1 - len(tokens[0]) / n) * R[c] / sum(R.values()) for c in R}
    record = {slot: w[c] * saliency[slot] for (c, j), slot in slots.items()}

    ids = sample["input_ids"][0].tolist()
    with torch.no_grad():
        out = model(
            **{key: sample[key] for key in ("input_ids", "pixel_values", "image_sizes")}, output_attentions=True
        )
    A = out.attentions[K][0]  # (h, N, N)
    vision = [p for p, t in enumerate(ids) if t == model.config.image_token_id]
    question = [p for p in range(vision[-1] + 1, len(ids))]
    relevance = {v: sum(A[:, q, p].mean().item() for q in question) / len(question) for v, p in enumerate(vision)}
    if variant == "bottom-up only":
        relevance = dict.fromkeys(relevance, 0.0)
    score = {}
    for c in crops:
        total = sum(relevance[v] for v in tokens[c])
        for v in tokens[c]:
            score[v] = (1 - alpha) * saliency[v] + alpha * (relevance[v] / total if total else 0.0)

    # budgets: k_p proportional to w_p, largest remainders (ties to the first crop); a full crop's excess re-shared
    budget, left, full = dict.fromkeys(crops, 0), k, set()
    weights = dict.fromkeys(crops, 1.0) if variant == "equal budgets" else w
    while left > 0:
        open_ = [c for c in crops if c not in full]
        quota = {c: left * weights[c] / sum(weights[c2] for c2 in open_) for c in open_}
        over = [c for c in open_ if budget[c] + int(quota[c]) >= len(tokens[c])]
        if over:  # give the capped crops all they have, and share again
            for c in over:
                left -= len(tokens[c]) - budget[c]
                budget[c] = len(tokens[c])
                full.add(c)
            continue
        for c in open_:
            budget[c] += int(quota[c])
        left -= sum(int(quota[c]) for c in open_)
        for c in sorted(open_, key=lambda c: (int(quota[c]) - quota[c], c))[:left]:
            budget[c] += 1
        left = 0
    kept = set()
    for c in crops:
        kept |= set(sorted(tokens[c], key=lambda v: score[v], reverse=True)[: budget[c]])
    return record, kept


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "sizes, ratio",
    [
        ([SIZES[0], SIZES[0]], 30 / 88),  # two square images: 2 x 2 tiles, 88 vision tokens
        ([SIZES[0], SIZES[0]], 60 / 88),  # the most salient tile's share is above its 16 tokens
        ([SIZES[1], SIZES[2]], 0.4),  # letterboxed: a 2 x 1 grid less 2 rows (46), a 1 x 2 grid (52)
    ],
)
def test_ptp_matches_the_literal_formula_on_each_crop(seed, sizes, ratio):
    """Two images in a left-padded batch; the tower record, then k_b kept after layer 1 (the ranking reads layer
    1's attention of the question tokens)."""
    (pruner, eager), rec = pruner_and_eager(seed), PlanRecording(get_policy("ptp"))
    batch = make_tiled_batch(pruner.model, sizes, [(2, 5), (4, 3)], seed=seed)
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=(-1, 1), keep_ratios=(1.0, ratio))
    for b, n in enumerate(vision_counts(pruner.model, sizes)):
        k = keep_count(ratio, n)
        record, kept = ptp_reference(eager, alone(batch, b), 1, k)
        values = dict(zip(rec.plans[0][0][b].tolist(), rec.plans[0][2][b].double().tolist()))
        assert {v: values[v] for v in record} == pytest.approx(record, rel=1e-4, abs=1e-7)
        assert all(values[v] == 0 for v in values if v not in record)  # the newlines and empty slots: no region
        assert set(rec.plans[1][0][b, :k].tolist()) == kept


@pytest.mark.parametrize(
    "variant, size",
    [("equal budgets", SIZES[0]), ("bottom-up only", SIZES[0]), ("padded grid", SIZES[1])],
)
def test_a_wrong_reading_fails_the_comparison(variant, size):
    """Region budgets split equally, the instruction's relevance left out, or the base view mapped onto the tile
    grid with its letterbox rows: the reference records or keeps something else."""
    (pruner, eager), rec = pruner_and_eager(0, 5.0, 5.0), PlanRecording(get_policy("ptp"))
    batch = make_tiled_batch(pruner.model, [size], [(2, 5)], seed=0)
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=(-1, 1), keep_ratios=(1.0, 0.34))
    k = keep_count(0.34, vision_counts(pruner.model, [size])[0])
    kept = set(rec.plans[1][0][0, :k].tolist())
    values = dict(zip(rec.plans[0][0][0].tolist(), rec.plans[0][2][0].double().tolist()))
    record, expected = ptp_reference(eager, alone(batch, 0), 1, k)
    assert kept == expected and {v: values[v] for v in record} == pytest.approx(record, rel=1e-4, abs=1e-7)
    record, expected = ptp_reference(eager, alone(batch, 0), 1, k, variant=variant)
    assert kept != expected or {v: values[v] for v in record} != pytest.approx(record, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_images_of_different_sizes_gives_each_sample_what_it_gets_alone(dtype):
    pruner = next_pruner(2)
    sizes = [SIZES[0], SIZES[1], SIZES[3]]  # 2 x 2, 1 x 2 letterboxed, 2 x 1 grids: 88, 46 and 56 tokens
    batch = make_tiled_batch(pruner.model, sizes, [(2, 6), (4, 3), (1, 8)], seed=2)
    counts = vision_counts(pruner.model, sizes)
    pruner.to(dtype)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    layers, ratios, policy = (-1, 1), (1.0, 0.3), get_policy("ptp")
    with torch.no_grad():
        together = pruner(**batch, policy=policy, layers=layers, keep_ratios=ratios)
        for i in range(3):
            single = pruner(**alone(batch, i), policy=policy, layers=layers, keep_ratios=ratios)
            for stage, ratio in enumerate(ratios):
                k = keep_count(ratio, counts[i])
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=tol, rtol=tol)
    new = pruner.generate(**batch, policy=policy, layers=layers, keep_ratios=ratios, max_new_tokens=3, eos_token_id=[])
    for i in range(3):
        single = pruner.generate(
            **alone(batch, i), policy=policy, layers=layers, keep_ratios=ratios, max_new_tokens=3, eos_token_id=[]
        )
        assert torch.equal(new[i, -3:], single[0, -3:])


def test_region_budgets_by_hand():
    assert region_budgets(10, [4, 8, 8], [0.2, 0.5, 0.3]) == [2, 5, 3]
    assert region_budgets(7, [4, 8, 8], [0.2, 0.4, 0.4]) == [1, 3, 3]  # 1.4, 2.8, 2.8: the larger fractions first
    assert region_budgets(10, [4, 2, 8], [0.1, 0.8, 0.1]) == [4, 2, 4]  # the capped region's excess re-shared
    assert region_budgets(30, [4, 2, 8], [0.1, 0.8, 0.1]) == [4, 2, 8]  # more than all: each its size
    assert region_budgets(3, [4, 4], [0.0, 0.0]) == [2, 1]  # no weight: equal shares, the first first


def test_ptp_fails_clearly_on_a_schedule_it_cannot_run():
    pruner = next_pruner(5)
    batch = make_tiled_batch(pruner.model, [SIZES[0]], [(1, 2)])
    with pytest.raises(ValueError, match=r"ptp reads the vision tower, then prunes once"):
        pruner(**batch, policy=PTPPolicy(), layers=(1,), keep_ratios=(0.5,))
    with pytest.raises(ValueError, match="ptp keeps every vision token at the vision tower"):
        pruner(**batch, policy=PTPPolicy(), layers=(-1, 1), keep_ratios=(0.5, 0.2))


@pytest.mark.parametrize("seed", [0, 1])
def test_ptp_on_llava_15_is_one_region(seed):
    """LLaVA-1.5's single view is one region (w = 1): the tower records s_j, and after layer 1 the top 16 of 64 by
    (1 - alpha) s_j + alpha r_j / sum r, literally (float64, HF's eager attention, each sample alone)."""
    batch, rec = run_engine(get_policy("ptp"), seed, (-1, 1), (1.0, 0.25))
    eager = build(seed, "eager").double()
    for b in range(len(LENGTHS)):
        ids, pixels = sample(batch, b)
        A = tower_pass(eager, pixels)[0][-2]  # (h, M, M) the layer whose output LLaVA projects
        a = [A[:, 0, j].mean().item() for j in range(1, P + 1)]
        s = [x / sum(a) for x in a]
        with torch.no_grad():
            attentions = eager(input_ids=ids[None], pixel_values=pixels, output_attentions=True).attentions
        vision = [p for p, t in enumerate(ids.tolist()) if t == IMAGE_TOKEN]
        question = range(vision[-1] + 1, len(ids))
        r = [sum(attentions[1][0, :, q, p].mean().item() for q in question) / len(question) for p in vision]
        score = [0.5 * s[j] + 0.5 * r[j] / sum(r) for j in range(P)]
        assert rec.plans[0][2][b].double().tolist() == pytest.approx(s, rel=1e-4, abs=1e-7)
        assert set(rec.plans[1][0][b].tolist()) == set(sorted(range(P), key=lambda j: score[j], reverse=True)[:16])
