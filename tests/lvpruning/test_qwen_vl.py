"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL against Hugging Face's own models, tiny and random: 3-D (M-RoPE) positions kept
by every surviving token, Qwen3-VL's DeepStack features carried by each vision token (its two tower blocks feed
decoder layers 0 and 1), images of different resolutions (different numbers of vision tokens) in one left-padded
batch, and decoding that continues where HF's ``generate`` does."""

from __future__ import annotations

import pytest
import torch

from lvpruning import PruningConfig, attach, engine, from_pretrained
from lvpruning.layout import BASE, EMPTY
from lvpruning.policies import POLICIES, get_policy
from lvpruning.qwen_vl import QwenVLAdapter
from lvpruning.stage import keep_count
from lvpruning.tiny import QWEN_VL_TOKENS, tiny_llava, tiny_qwen_vl_config
from tests.lvpruning.conftest import VOCAB, decisions_of

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
GRIDS = [(1, 8, 8), (1, 4, 6), (1, 6, 10), (1, 4, 4)]  # (t, h, w) patches: 16, 6, 15 and 4 vision tokens
LLM_METHODS = [name for name in POLICIES if POLICIES[name].published.layers[0] >= 0]
IMAGE, START, END = QWEN_VL_TOKENS["image"], QWEN_VL_TOKENS["vision_start"], QWEN_VL_TOKENS["vision_end"]
RATIOS = (0.5, 0.3, 0.1)


def qwen_pruner(family, seed=0, layers=(0, 1, 2), dtype=torch.float32):
    model = tiny_llava(tiny_qwen_vl_config(family, vocab_size=VOCAB, num_layers=5), seed=seed).to(dtype)
    torch.manual_seed(seed + 1000)
    ratios = RATIOS[: len(layers)]
    pruning = PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, num_heads=4)
    return attach(model, pruning).to(dtype).eval()


def make_qwen_batch(model, grids, lengths, seed=0) -> dict[str, torch.Tensor]:
    """``[BOS, a text tokens, <|vision_start|>, <|image_pad|> x t*h*w/4, <|vision_end|>, b text tokens]`` per
    ``(a, b)`` in ``lengths``, left-padded, with the flattened patches ``pixel_values`` (sum P_b, D) and
    ``image_grid_thw`` (B, 3), as Qwen-VL's processor returns them."""
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2  # D
    samples = [
        [1, *torch.randint(10, VOCAB, (a,), generator=g).tolist(), START, *[IMAGE] * (t * h * w // 4), END]
        + torch.randint(10, VOCAB, (b,), generator=g).tolist()
        for (a, b), (t, h, w) in zip(lengths, grids)
    ]
    N = max(map(len, samples))
    input_ids = torch.full((len(samples), N), 3)
    attention_mask = torch.zeros(len(samples), N, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, N - len(s) :] = torch.tensor(s)
        attention_mask[i, N - len(s) :] = 1
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(patches, patch, generator=g),
        "image_grid_thw": torch.tensor(grids),
    }


def alone(batch, i) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a left-padded batch on its own: its padding removed, its own patches and grid."""
    keep = batch["attention_mask"][i].bool()
    out = {k: batch[k][i : i + 1, keep] for k in ("input_ids", "attention_mask")}
    patches = batch["image_grid_thw"].prod(-1).tolist()
    out["pixel_values"] = batch["pixel_values"][sum(patches[:i]) : sum(patches[: i + 1])]
    out["image_grid_thw"] = batch["image_grid_thw"][i : i + 1]
    return out


def hf(batch) -> dict[str, torch.Tensor]:
    """The batch as HF's Qwen-VL takes it: with the processor's ``mm_token_type_ids`` (1 on image tokens)."""
    return batch | {"mm_token_type_ids": (batch["input_ids"] == IMAGE).int()}


def counts(batch) -> list[int]:
    return (batch["image_grid_thw"].prod(-1) // 4).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_gives_hf_logits_and_hf_generate_tokens(family):
    pruner = qwen_pruner(family, seed=1)
    batch = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[1]], [(3, 5), (2, 9)], seed=1)
    full = (1.0, 1.0, 1.0)
    with torch.no_grad():
        for i in range(2):
            single = alone(batch, i)
            expected = pruner.model(**hf(single)).logits
            torch.testing.assert_close(pruner(**single, keep_ratios=full).logits, expected, atol=1e-5, rtol=1e-5)
        expected = pruner.model(**hf(batch)).logits
        ours = pruner(**batch, keep_ratios=full).logits  # the equalized layout: compare the question's tokens
        torch.testing.assert_close(ours[:, -5:], expected[:, -5:], atol=1e-5, rtol=1e-5)
        expected = pruner.model.generate(**hf(batch), max_new_tokens=6, do_sample=False, eos_token_id=None)
    ours = pruner.generate(**batch, keep_ratios=full, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ours, expected)


def hf_prompt(model, single) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One sample as HF's model sees it: the embeddings (1, N, C) with its ``get_image_features`` scattered in, the
    vision mask (N,), the 3-D positions (3, 1, N) of its ``get_rope_index``, and Qwen3-VL's DeepStack features (each
    (n, C), none on the other families)."""
    inputs = hf(single)
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # (1, N, C)
    image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    vision = inputs["input_ids"][0] == IMAGE  # (N,)
    embeds[0, vision] = torch.cat(image.pooler_output)
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )  # (3, 1, N)
    deepstack = [torch.cat(feature) for feature in getattr(image, "deepstack_features", None) or []]
    return embeds, vision, positions, deepstack


def kept_embeddings_reference(model, single, kept) -> torch.Tensor:
    """HF's own model fed the prompt's embeddings at the text tokens and the ``kept`` (k,) vision tokens, each at its
    original 3-D position (HF's ``get_rope_index``), and on Qwen3-VL the kept tokens' DeepStack features at their
    positions (HF's language model's ``visual_pos_masks`` and ``deepstack_visual_embeds``): logits (1, n, V)."""
    embeds, vision, positions, deepstack = hf_prompt(model, single)
    keep = ~vision
    keep[vision.nonzero()[kept, 0]] = True
    index = keep.nonzero()[:, 0]  # (n,) in sequence order
    if not deepstack:
        return model(inputs_embeds=embeds[:, index], position_ids=positions[:, :, index]).logits
    hidden = model.model.language_model(
        inputs_embeds=embeds[:, index],
        position_ids=positions[:, :, index],
        visual_pos_masks=vision[None, index],
        deepstack_visual_embeds=[feature[kept.sort().values] for feature in deepstack],
    ).last_hidden_state
    return model.lm_head(hidden)


def removal_reference(model, single, kept_by_layer) -> torch.Tensor:
    """A slow loop over HF's own decoder layers on one unpadded sample: after decoder layer ``i`` in
    ``kept_by_layer`` only the text tokens and the vision tokens ``kept_by_layer[i]`` (indices among the image's)
    go on, each at its original 3-D position; after layer ``i`` < L each vision token still there gets its own
    DeepStack feature ``i`` added (Qwen3-VL). Logits (1, n, V) of the final sequence."""
    embeds, vision, positions, deepstack = hf_prompt(model, single)
    decoder = model.model.language_model
    index = torch.arange(vision.shape[0])  # original positions still in the sequence
    image_slot = torch.cumsum(vision.long(), 0) - 1  # (N,) each vision token's index among the image's
    hidden = embeds
    for i, layer in enumerate(decoder.layers):
        rope = decoder.rotary_emb(hidden, positions[:, :, index])
        hidden = layer(hidden, position_embeddings=rope, attention_mask=None)  # causal, no padding
        if i < len(deepstack):
            here = vision[index]
            hidden[0, here] = hidden[0, here] + deepstack[i][image_slot[index[here]]]
        if i in kept_by_layer:
            keep = ~vision[index] | torch.isin(image_slot[index], kept_by_layer[i])
            hidden, index = hidden[:, keep], index[keep]
    return model.lm_head(decoder.norm(hidden))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["random", "star"])
def test_pruning_before_the_first_layer_gives_hf_logits_on_the_kept_embeddings_at_their_3d_positions(family, name):
    """A subset kept before decoder layer 0 (random, or STAR's visual self-attention: the vision-tower stages that
    read no tower), alone and in a padded batch, against HF's model fed those embeddings with their
    ``position_ids``."""
    pruner = qwen_pruner(family, seed=2)
    batch = make_qwen_batch(pruner.model, [GRIDS[2], GRIDS[0]], [(2, 6), (4, 3)], seed=2)
    policy = get_policy(name, seed=3)
    with torch.no_grad():
        together = pruner(**batch, policy=policy, layers=(-1,), keep_ratios=(0.4,))
        for i, (n, after) in enumerate(zip(counts(batch), (6, 3))):
            single = alone(batch, i)
            out = pruner(**single, policy=policy, layers=(-1,), keep_ratios=(0.4,))
            kept = out.kept_vision[0][0]
            assert len(kept) == keep_count(0.4, n) < n
            expected = kept_embeddings_reference(pruner.model, single, kept)
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.logits[i, -after:], expected[0, -after:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["random", "fastv"])
def test_pruning_after_decoder_layers_gives_a_slow_loop_over_hf_layers(family, name):
    """Stages after decoder layers 0 and 1 (on Qwen3-VL inside its DeepStack layers 0 and 1: a removed token takes
    its later DeepStack features with it, a kept one keeps its own) and 3, against a loop over HF's own decoder
    layers that removes the same tokens (a policy's ranking is its business: the kept sets are taken from it)."""
    pruner = qwen_pruner(family, seed=11, layers=(0, 1, 3))
    batch = make_qwen_batch(pruner.model, [GRIDS[0]], [(3, 5)], seed=11)
    policy = get_policy(name, seed=5)
    with torch.no_grad():
        out = pruner(**batch, policy=policy, layers=(0, 1, 3))
        kept = dict(zip((0, 1, 3), out.kept_vision))
        expected = removal_reference(pruner.model, batch, {i: k[0] for i, k in kept.items()})
        assert [len(k[0]) for k in kept.values()] == [8, 4, 1]
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_attention_rows_are_hf_eager_attention(family):
    """The rows policies read (``attention_rows``) against HF's eager attention maps (``output_attentions``) of
    decoder layer 0, whose input is the embeddings: the same M-RoPE (Qwen3-VL's interleaved), and on Qwen3-VL its
    per-head q/k norms (given random weights here, so that a missing norm shows)."""
    config = tiny_qwen_vl_config(family, vocab_size=VOCAB, num_layers=2)
    model = tiny_llava(config, seed=12, attn_implementation="eager")
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.uniform_(0.5, 2.0)
    pruner = attach(model, PruningConfig(layers=(0,), train_ratios=(0.5,), infer_ratios=(0.5,), num_heads=4))
    batch = make_qwen_batch(model, [GRIDS[1]], [(3, 5)], seed=12)
    embeds, vision, positions, _ = hf_prompt(model, batch)
    queries = torch.tensor([[len(vision) - 1, int(vision.nonzero()[2]), 2]])  # (1, Q): last, a vision token, text
    with torch.no_grad():
        maps = model(**hf(batch), output_attentions=True).attentions[0]  # (1, h, N, N)
        rows = pruner.adapter.attention_rows(0, embeds, positions, torch.ones_like(vision)[None], queries)
    torch.testing.assert_close(rows, maps[:, :, queries[0]].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,name", [(family, name) for family in FAMILIES for name in LLM_METHODS])
def test_a_batch_of_images_of_different_sizes_gives_each_sample_what_it_gets_alone(family, name):
    pruner = qwen_pruner(family, seed=3)
    batch = make_qwen_batch(pruner.model, GRIDS[:3], [(2, 6), (4, 3), (1, 8)], seed=3)
    policy = get_policy(name, seed=1, decision_modules=pruner.decision_modules)
    with torch.no_grad():
        together = pruner(**batch, policy=policy)
        for i, n in enumerate(counts(batch)):
            single = pruner(**alone(batch, i), policy=policy)
            for stage, ratio in enumerate(RATIOS):
                k = keep_count(ratio, n)  # of the sample's own vision tokens
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
                assert together.keep_fractions[i, stage] == pytest.approx(k / n)
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)
    new = pruner.generate(**batch, policy=policy, max_new_tokens=3, eos_token_id=[])
    for i in range(3):
        single = pruner.generate(**alone(batch, i), policy=policy, max_new_tokens=3, eos_token_id=[])
        assert torch.equal(new[i, -3:], single[0, -3:])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_masks_equal_inference_removal_at_random_decisions(family, monkeypatch):
    """Hard decisions that keep what inference kept (each sample its own k_b) give, by masking (eq. 9), the logits
    that removal gives (eqs. 13-14) at the question's tokens, and each sample's own keep fractions."""
    pruner = qwen_pruner(family, seed=4)
    lengths = [(3, 4), (2, 6)]
    batch = make_qwen_batch(pruner.model, [GRIDS[1], GRIDS[0]], lengths, seed=4)
    n = counts(batch)
    with torch.no_grad():
        removed = pruner(**batch, policy=get_policy("random", seed=4))
        decisions = decisions_of(removed.kept_vision, max(n))
        monkeypatch.setattr(engine, "gumbel_decisions", lambda gamma, tau: decisions.pop(0))
        masked = pruner.train()(**batch)
    index = removed.token_index  # (B, N_out) positions (of the equalized layout) that survived
    for i, (_, after) in enumerate(lengths):
        aligned = masked.logits[i].gather(0, index[i, -after:, None].expand(-1, masked.logits.shape[-1]))
        torch.testing.assert_close(aligned, removed.logits[i, -after:], atol=1e-4, rtol=1e-4)
        expected = [keep_count(r, n[i]) / n[i] for r in RATIOS]
        torch.testing.assert_close(masked.keep_fractions[i], torch.tensor(expected))


def reference_generate(pruner, batch, steps, **prune) -> torch.Tensor:
    """Re-run the pruned forward on the whole growing sequence, without a cache, and take the argmax (the
    instruction tokens stay the prompt's, since generation prunes once, in the prefill)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    instruction = mask.bool() & (ids != IMAGE)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    for _ in range(steps):
        out = pruner(input_ids=ids, attention_mask=mask, instruction_mask=instruction, **images, **prune)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
        instruction = torch.cat([instruction, torch.zeros_like(next_token, dtype=torch.bool)], 1)
    return ids


@pytest.mark.parametrize("family,name", [(f, n) for f in FAMILIES for n in ("lvpruning", "fastv", "transprune")])
def test_cached_generation_matches_a_cache_free_rerun(family, name):
    pruner = qwen_pruner(family, seed=5)
    batch = make_qwen_batch(pruner.model, [GRIDS[3], GRIDS[2]], [(3, 6), (1, 9)], seed=5)
    policy = get_policy(name, seed=2, decision_modules=pruner.decision_modules)
    with torch.no_grad():
        expected = reference_generate(pruner, batch, steps=5, policy=policy)
    generated = pruner.generate(**batch, policy=policy, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(generated, expected)


def extended(batch, tokens) -> dict[str, torch.Tensor]:
    """``batch`` with ``tokens`` (B, t) appended to every prompt."""
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
    return batch | {"input_ids": torch.cat([batch["input_ids"], tokens], 1), "attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruned", [False, True])
def test_each_decoding_step_gives_the_logits_of_the_whole_sequence_at_hf_positions(family, pruned):
    """Every cached decoding step's logits equal, unpruned, those of HF's model on the whole sequence (its 3-D
    positions: the prompt's largest + 1, + 2, ...), and pruned, those of a cache-free pruned rerun (the same kept
    tokens: the instruction stays the prompt's)."""
    pruner = qwen_pruner(family, seed=9)
    batch = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[1]], [(3, 4), (2, 7)], seed=9)
    prune = {"policy": get_policy("lvpruning", decision_modules=pruner.decision_modules)}
    prune |= {} if pruned else {"keep_ratios": (1.0, 1.0, 1.0)}
    instruction = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    tokens = torch.randint(10, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = pruner(**batch, **prune, use_cache=True, logits_to_keep=1).cache
        for step in range(tokens.shape[1]):
            logits = pruner.decode_step(tokens[:, step : step + 1], cache)[:, -1]
            longer = extended(batch, tokens[:, : step + 1])
            if pruned:
                extra = torch.zeros_like(tokens[:, : step + 1], dtype=torch.bool)
                expected = pruner(**longer, **prune, instruction_mask=torch.cat([instruction, extra], 1)).logits
            else:
                expected = pruner.model(**hf(longer)).logits
            torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_generate_calls_give_the_same_tokens(family):
    """No stale ``rope_deltas``: a batch generates the same before and after another batch of other images and
    lengths, pruned or not, and HF's own ``generate`` agrees where nothing is pruned."""
    pruner = qwen_pruner(family, seed=6)
    first = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[1]], [(2, 4), (5, 2)], seed=6)
    other = make_qwen_batch(pruner.model, [GRIDS[3], GRIDS[2], GRIDS[1]], [(9, 1), (1, 7), (3, 3)], seed=7)
    full = (1.0, 1.0, 1.0)
    runs = []
    for keep_ratios in (None, full, None, full):
        runs.append(pruner.generate(**first, keep_ratios=keep_ratios, max_new_tokens=5, eos_token_id=[]))
        pruner.generate(**other, keep_ratios=keep_ratios, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])
    with torch.no_grad():
        pruner.model.generate(**hf(other), max_new_tokens=3, do_sample=False, eos_token_id=None)
        expected = pruner.model.generate(**hf(first), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(runs[1], expected)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_layout_gives_each_vision_token_its_cell_in_the_merged_grid(family):
    """Reference: HF's ``get_rope_index``, whose height and width positions of an image's tokens are its cells
    offset by the image's start position."""
    pruner = qwen_pruner(family, seed=7)
    batch = make_qwen_batch(pruner.model, GRIDS, [(1, 2)] * len(GRIDS), seed=7)
    n = counts(batch)
    layout = pruner.adapter.layout(len(GRIDS), batch["image_grid_thw"], max(n))
    inputs = hf(batch)
    positions, _ = pruner.model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    for i in range(len(GRIDS)):
        _, height, width = positions[:, i, batch["input_ids"][i] == IMAGE]  # (n_b,) each
        start = positions[0, i, batch["input_ids"][i] == IMAGE][0]
        assert torch.equal(layout.row[i, : n[i]], height - start)
        assert torch.equal(layout.col[i, : n[i]], width - start)
        assert bool((layout.kind[i, : n[i]] == BASE).all()) and bool((layout.kind[i, n[i] :] == EMPTY).all())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bf16_batch_runs_and_matches_hf_where_nothing_is_pruned(family):
    pruner = qwen_pruner(family, seed=8, dtype=torch.bfloat16)
    batch = make_qwen_batch(pruner.model, [GRIDS[0], GRIDS[2]], [(2, 5), (3, 4)], seed=8)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        out = pruner(**batch)
        expected = pruner.model(**hf(alone(batch, 0))).logits[0, -1]
        full = pruner(**alone(batch, 0), keep_ratios=(1.0, 1.0, 1.0)).logits[0, -1]
    assert out.logits.dtype == torch.bfloat16 and bool(out.logits.isfinite().all())
    torch.testing.assert_close(full, expected, atol=2e-2, rtol=2e-2)
    for i, n in enumerate(counts(batch)):
        assert out.keep_fractions[i, -1] == pytest.approx(keep_count(0.1, n) / n)
    generated = pruner.generate(**batch, max_new_tokens=2, eos_token_id=[])
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_tower_stage_is_refused_by_name_before_model_work(family, monkeypatch):
    pruner = qwen_pruner(family)
    batch = make_qwen_batch(pruner.model, [GRIDS[1]], [(1, 2)])

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(pruner.adapter, "embed", no_model_work)
    name = type(pruner.model).__name__
    with pytest.raises(ValueError, match=rf"vflowopt's vision-tower stage \(layer -1\) .* {name}"):
        pruner(**batch, policy=get_policy("vflowopt"), layers=(-1, 1), keep_ratios=(0.5, 0.3))
    with pytest.raises(ValueError, match="needs image_grid_thw"):
        qwen_pruner(family)(**{k: v for k, v in batch.items() if k != "image_grid_thw"})
    config = tiny_qwen_vl_config(family)
    config.text_config.use_sliding_window, config.text_config.sliding_window = True, 8
    with pytest.raises(ValueError, match="sliding_window = 8"):
        attach(tiny_llava(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_loads_a_saved_qwen_vl_and_attach_picks_its_adapter(family, tmp_path):
    model = tiny_llava(tiny_qwen_vl_config(family, vocab_size=VOCAB), seed=10)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path))
    assert type(loaded) is type(model)
    pruner = attach(loaded, PruningConfig(layers=(0,), train_ratios=(0.5,), infer_ratios=(0.5,), num_heads=4))
    assert isinstance(pruner.adapter, QwenVLAdapter)
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
