"""LLaVA-NeXT and LLaVA-OneVision (anyres tiles) against Hugging Face's own models, tiny and random, for each decoder
they ship: images of different sizes give different numbers of vision tokens, and every sample of a batch gets what
it gets alone."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lvpruning import PruningConfig, attach, engine
from lvpruning.layout import BASE, EMPTY, NEWLINE, TILE
from lvpruning.policies import POLICIES, get_policy
from lvpruning.stage import keep_count
from lvpruning.tiny import tiny_llava, tiny_llava_config, tiny_tiled_config
from tests.lvpruning.conftest import IMAGE_TOKEN, VOCAB, decisions_of

MODELS = [("llava_next", "llama"), ("llava_next", "mistral"), ("llava_next", "qwen2"), ("llava_onevision", "qwen2")]
SIZES = [(32, 32), (20, 12), (16, 32), (32, 16)]  # (height, width): 88, 46, 52 and 56 vision tokens
LLM_METHODS = [name for name in POLICIES if POLICIES[name].published.layers[0] >= 0]


def vision_counts(model, sizes) -> list[int]:
    """Each image's number of vision tokens, from HF's own ``get_image_features`` (the packed features' lengths)."""
    tile = model.config.vision_config.image_size
    counts = []
    for size in sizes:
        tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, tile)
        features = model.model.get_image_features(
            pixel_values=torch.zeros(1, tiles, 3, tile, tile), image_sizes=torch.tensor([size])
        )
        counts.append(features.pooler_output[0].shape[0])
    return counts


def make_tiled_batch(model, sizes, lengths, seed=0) -> dict[str, torch.Tensor]:
    """``[BOS, a text tokens, <image> x n_b, b text tokens]`` per ``(a, b)`` in ``lengths``, left-padded, with
    ``pixel_values`` (B, max tiles, 3, S, S) zero-padded as the processors pad them, and ``image_sizes``."""
    g = torch.Generator().manual_seed(seed)
    tile = model.config.vision_config.image_size
    counts = vision_counts(model, sizes)
    samples = [
        [1, *torch.randint(10, VOCAB, (a,), generator=g).tolist(), *[IMAGE_TOKEN] * n]
        + torch.randint(10, VOCAB, (b,), generator=g).tolist()
        for (a, b), n in zip(lengths, counts)
    ]
    N = max(map(len, samples))
    input_ids = torch.full((len(samples), N), 3)
    attention_mask = torch.zeros(len(samples), N, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, N - len(s) :] = torch.tensor(s)
        attention_mask[i, N - len(s) :] = 1
    tiles = [image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, tile) for size in sizes]
    pixel_values = torch.zeros(len(sizes), max(tiles), 3, tile, tile)
    for i, n in enumerate(tiles):
        pixel_values[i, :n] = torch.randn(n, 3, tile, tile, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor(sizes),
    }


def alone(batch, i) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a left-padded batch on its own: its padding and its padded tiles removed."""
    keep = batch["attention_mask"][i].bool()
    out = {k: batch[k][i : i + 1, keep] for k in ("input_ids", "attention_mask")}
    tiles = int(batch["pixel_values"][i].flatten(1).ne(0).any(1).sum())
    out["pixel_values"] = batch["pixel_values"][i : i + 1, :tiles]
    out["image_sizes"] = batch["image_sizes"][i : i + 1]
    return out


def tiled_pruner(family, decoder, seed=0, layers=(0, 1, 2), dtype=torch.float32):
    model = tiny_llava(tiny_tiled_config(family, decoder, num_layers=5), seed=seed).to(dtype)
    torch.manual_seed(seed + 1000)
    ratios = (0.5, 0.3, 0.1)[: len(layers)]
    pruning = PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, num_heads=4)
    return attach(model, pruning).to(dtype).eval()


@pytest.mark.parametrize("family,decoder", MODELS)
def test_nothing_pruned_gives_hf_logits_and_hf_generate_tokens(family, decoder):
    pruner = tiled_pruner(family, decoder, seed=1)
    batch = make_tiled_batch(pruner.model, [SIZES[0], SIZES[1]], [(3, 5), (2, 9)], seed=1)
    with torch.no_grad():
        for i in range(2):
            single = alone(batch, i)
            expected = pruner.model(**single).logits
            out = pruner(**single, keep_ratios=(1.0, 1.0, 1.0))
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
        expected = pruner.model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    ours = pruner.generate(**batch, keep_ratios=(1.0, 1.0, 1.0), max_new_tokens=5, eos_token_id=[])
    assert torch.equal(ours, expected)


# every method on LLaVA-NeXT-Llama; on the other decoders, those that read the decoder's attention or records too
BATCHED = [(*MODELS[0], name) for name in LLM_METHODS] + [
    (*model, name) for model in MODELS[1:] for name in ("lvpruning", "fastv", "transprune")
]


@pytest.mark.parametrize("family,decoder,name", BATCHED)
def test_a_batch_of_images_of_different_sizes_gives_each_sample_what_it_gets_alone(family, decoder, name):
    pruner = tiled_pruner(family, decoder, seed=2)
    sizes = [SIZES[0], SIZES[1], SIZES[3]]
    batch = make_tiled_batch(pruner.model, sizes, [(2, 6), (4, 3), (1, 8)], seed=2)
    counts = vision_counts(pruner.model, sizes)
    policy = get_policy(name, seed=1, decision_modules=pruner.decision_modules)
    with torch.no_grad():
        together = pruner(**batch, policy=policy)
        for i in range(3):
            single = pruner(**alone(batch, i), policy=policy)
            for stage, ratio in enumerate((0.5, 0.3, 0.1)):
                k = keep_count(ratio, counts[i])  # of the sample's own vision tokens
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
                assert together.keep_fractions[i, stage] == pytest.approx(k / counts[i])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)
    new = pruner.generate(**batch, policy=policy, max_new_tokens=3, eos_token_id=[])
    for i in range(3):
        single = pruner.generate(**alone(batch, i), policy=policy, max_new_tokens=3, eos_token_id=[])
        assert torch.equal(new[i, -3:], single[0, -3:])


def forced_decisions(kept_vision, batch_size, num_slots):
    """Gumbel sampling replaced by the decisions that keep exactly ``kept_vision`` (one stage per call)."""
    queue = list(kept_vision)

    def decide(gamma, tau):
        return torch.zeros(batch_size, num_slots).scatter(1, queue.pop(0), 1.0)

    return decide


@pytest.mark.parametrize("family,decoder", MODELS)
def test_training_masks_equal_inference_removal_on_images_of_different_sizes(family, decoder, monkeypatch):
    """Hard decisions that keep what inference kept (each sample its own k_b) give, by masking (eq. 9), the logits
    that removal gives (eqs. 13-14) at the question's tokens, and each sample's own keep fractions."""
    pruner = tiled_pruner(family, decoder, seed=3)
    sizes, lengths = [SIZES[1], SIZES[0]], [(3, 4), (2, 6)]
    batch = make_tiled_batch(pruner.model, sizes, lengths, seed=3)
    counts = vision_counts(pruner.model, sizes)
    with torch.no_grad():
        removed = pruner(**batch, policy=get_policy("random", seed=4))
        decisions = decisions_of(removed.kept_vision, max(counts))
        monkeypatch.setattr(engine, "gumbel_decisions", lambda gamma, tau: decisions.pop(0))
        masked = pruner.train()(**batch)
    index = removed.token_index  # (B, N_out) positions (of the equalized layout) that survived
    for i, (_, after) in enumerate(lengths):  # the question after the image: real tokens at the end of both
        aligned = masked.logits[i].gather(0, index[i, -after:, None].expand(-1, masked.logits.shape[-1]))
        torch.testing.assert_close(aligned, removed.logits[i, -after:], atol=1e-4, rtol=1e-4)
        expected = [keep_count(r, counts[i]) / counts[i] for r in (0.5, 0.3, 0.1)]
        torch.testing.assert_close(masked.keep_fractions[i], torch.tensor(expected))


def test_layout_names_each_vision_token_by_the_tower_feature_it_carries():
    """Reference: each packed feature of HF's own LLaVA-NeXT matched, by value, to the projected tower output of the
    base view or of one tile at one cell, or to the learned newline."""
    model = tiny_llava(tiny_tiled_config("llava_next", "llama"), seed=5)
    pruner = attach(model, PruningConfig(layers=(0,), train_ratios=(0.5,), infer_ratios=(0.5,), num_heads=4))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    grid_width = {(32, 32): 2, (20, 12): 1, (16, 32): 2, (32, 16): 1}
    batch = make_tiled_batch(model, SIZES, [(1, 2)] * len(SIZES), seed=5)
    layout = pruner.adapter.layout(len(SIZES), batch["image_sizes"], batch["input_ids"].eq(IMAGE_TOKEN).sum(1).max())
    with torch.no_grad():
        for i, size in enumerate(SIZES):
            pixels = alone(batch, i)["pixel_values"][0]  # (tiles, 3, S, S)
            packed = model.model.get_image_features(
                pixel_values=pixels[None], image_sizes=batch["image_sizes"][i : i + 1]
            )
            packed = packed.pooler_output[0]  # (n, C)
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            per_tile = model.model.multi_modal_projector(hidden)  # (tiles, side^2, C)
            for j, feature in enumerate(packed):
                kind, tile, row, col = (int(t[i, j]) for t in (layout.kind, layout.tile, layout.row, layout.col))
                if kind == NEWLINE:
                    torch.testing.assert_close(feature, model.model.image_newline)
                    continue
                if kind == BASE:
                    expected = per_tile[0, row * side + col]
                else:
                    assert kind == TILE
                    assert tile == (row // side) * grid_width[size] + col // side
                    expected = per_tile[1 + tile, (row % side) * side + col % side]
                torch.testing.assert_close(feature, expected)
            assert bool((layout.kind[i, len(packed) :] == EMPTY).all())


def test_onevision_layout_follows_its_downscaled_grid():
    """OneVision shrinks a grid larger than ``anyres_max_N`` allows: the layout has one entry per packed feature,
    rows and columns inside the grid, one newline per (downscaled) row."""
    model = tiny_llava(tiny_tiled_config("llava_onevision", "qwen2", vision_aspect_ratio="anyres_max_2"), seed=6)
    pruner = attach(model, PruningConfig(layers=(0,), train_ratios=(0.5,), infer_ratios=(0.5,), num_heads=4))
    counts = vision_counts(model, [(32, 32)])
    layout = pruner.adapter.layout(1, torch.tensor([(32, 32)]), counts[0])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert counts[0] < side * side + 4 * side * side + 2 * side  # downscaled
    kind = layout.kind[0]
    rows = layout.row[0][kind == TILE]
    assert int((kind == NEWLINE).sum()) == len(rows.unique())
    assert int(rows.max()) < 2 * side and int(layout.col[0][kind == TILE].max()) < 2 * side


def test_bf16_tiled_batch_runs_and_prunes_each_sample_to_its_own_count():
    pruner = tiled_pruner("llava_next", "qwen2", seed=7, dtype=torch.bfloat16)
    batch = make_tiled_batch(pruner.model, [SIZES[0], SIZES[2]], [(2, 5), (3, 4)], seed=7)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    counts = vision_counts(pruner.model.float(), [SIZES[0], SIZES[2]])
    pruner.model.bfloat16()
    with torch.no_grad():
        out = pruner(**batch)
        expected = pruner.model(**alone(batch, 0)).logits[0, -1]
        full = pruner(**alone(batch, 0), keep_ratios=(1.0, 1.0, 1.0)).logits[0, -1]
    assert out.logits.dtype == torch.bfloat16 and bool(out.logits.isfinite().all())
    torch.testing.assert_close(full, expected, atol=2e-2, rtol=2e-2)
    for i in range(2):
        assert out.keep_fractions[i, -1] == pytest.approx(keep_count(0.1, counts[i]) / counts[i])
    generated = pruner.generate(**batch, max_new_tokens=2, eos_token_id=[])
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)


def test_tiled_models_fail_clearly_before_model_work():
    pruner = tiled_pruner("llava_next", "llama")
    batch = make_tiled_batch(pruner.model, [SIZES[0]], [(1, 2)])
    with pytest.raises(ValueError, match="needs image_sizes"):
        pruner(**{k: v for k, v in batch.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match="vflowopt's vision-tower stage .* LLaVA-1.5 only"):
        pruner(**batch, policy=get_policy("vflowopt"), layers=(-1,), keep_ratios=(0.5,))
    two = make_tiled_batch(pruner.model, [SIZES[2], SIZES[3]], [(1, 2), (1, 2)])  # 3 tiles each
    swapped = dict(two, image_sizes=two["image_sizes"].flip(0))  # as many features in all, not per sample
    with pytest.raises(ValueError, match=r"\[52, 56\] image tokens for \[56, 52\] features"):
        pruner(**swapped)
    config = tiny_tiled_config("llava_next", "mistral")
    config.text_config.sliding_window = 8
    with pytest.raises(ValueError, match="sliding_window = 8"):
        attach(tiny_llava(config))


def test_llava_with_every_tower_token_counts_the_cls_token_as_a_vision_token():
    """LLaVA-1.5's ``full`` feature selection keeps the CLS token: 65 vision tokens, the first outside the grid."""
    config = tiny_llava_config(vocab_size=VOCAB)
    config.vision_feature_select_strategy = "full"
    pruning = PruningConfig(layers=(0, 1), train_ratios=(0.5, 0.25), infer_ratios=(0.5, 0.25), num_heads=4)
    pruner = attach(tiny_llava(config, seed=8), pruning).eval()
    g = torch.Generator().manual_seed(8)
    words = torch.randint(10, VOCAB, (9,), generator=g)
    input_ids = torch.cat([torch.tensor([1]), words[:5], torch.full((65,), IMAGE_TOKEN), words[5:]])[None]
    pixel_values = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = pruner(input_ids=input_ids, pixel_values=pixel_values, keep_ratios=(1.0, 0.5))
        full = pruner(input_ids=input_ids, pixel_values=pixel_values, keep_ratios=(1.0, 1.0)).logits
        expected = pruner.model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    assert out.kept_vision[1].shape == (1, keep_count(0.5, 65))
    layout = pruner.adapter.layout(1, None, 65)
    assert layout.row[0, :2].tolist() == [-1, 0] and layout.col[0, -1] == 7 and bool((layout.kind == BASE).all())
