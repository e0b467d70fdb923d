"""LVPruning's decision module at the vision-tower stage (layer -1, an extension of the paper): its queries the
projected vision tokens, its keys and values the instruction's input embeddings, on tiny random LLaVA-1.5,
LLaVA-NeXT and LLaVA-OneVision (tiles: each sample its own count), Qwen2.5-VL (M-RoPE) and Qwen3-VL (DeepStack)
models. References: Hugging Face's own
embeddings and language model on the kept tokens, the masked training forward against removal, each sample alone,
a cache-free rerun, a checkpoint reloaded, and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from lvpruning import PruningConfig, attach, engine, load_decision_modules, save_decision_modules
from lvpruning.checkpoint import read_pruning_config
from lvpruning.decision import keep_scores
from lvpruning.flops import analytic_flops, decision_module_flops, measure_flops
from lvpruning.stage import keep_count
from lvpruning.tiny import tiny_llava, tiny_llava_config, tiny_qwen_vl_config, tiny_tiled_config
from tests.lvpruning.conftest import IMAGE_TOKEN, NUM_VISION, VOCAB, decisions_of, make_batch
from tests.lvpruning.test_flops import assert_close, tiny_next_config, tiny_onevision_config
from tests.lvpruning.test_qwen_vl import GRIDS, kept_embeddings_reference, make_qwen_batch
from tests.lvpruning.test_qwen_vl import alone as qwen_alone
from tests.lvpruning.test_slim import gradients
from tests.lvpruning.test_tiled import SIZES, make_tiled_batch, vision_counts
from tests.lvpruning.test_tiled import alone as tiled_alone

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"]
TILED = ("llava_next", "llava_onevision")
LAYERS, RATIOS = (-1, 1, 2), (0.5, 0.3, 0.1)


def tower_model(family: str, seed: int = 0):
    if family == "llava":
        return tiny_llava(tiny_llava_config(num_layers=5, vocab_size=VOCAB), seed=seed)
    if family in TILED:
        decoder = "llama" if family == "llava_next" else "qwen2"
        return tiny_llava(tiny_tiled_config(family, decoder, num_layers=5), seed=seed)
    return tiny_llava(tiny_qwen_vl_config(family, vocab_size=VOCAB, num_layers=5), seed=seed)


def tower_pruner(family: str, seed: int = 0, layers=LAYERS, ratios=RATIOS, dtype=torch.float32, **config):
    """Decision modules at ``layers`` (the first at the vision tower), randomly initialised and perturbed so that the
    scores are far from uniform."""
    model = tower_model(family, seed).to(dtype)
    torch.manual_seed(seed + 1000)
    pruning = PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, num_heads=4, **config)
    pruner = attach(model, pruning).to(dtype).eval()
    with torch.no_grad():
        for p in pruner.decision_modules.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return pruner


def tower_batch(pruner, family: str, lengths: list[tuple[int, int]], seed: int = 0):
    """A left-padded batch of ``(a, b)`` text tokens around each image (images of different sizes on the tiled and
    Qwen families) and each sample's number of vision tokens."""
    if family == "llava":
        return make_batch(lengths, seed=seed), [NUM_VISION] * len(lengths)
    if family in TILED:
        sizes = [SIZES[(i + seed) % len(SIZES)] for i in range(len(lengths))]
        return make_tiled_batch(pruner.model, sizes, lengths, seed=seed), vision_counts(pruner.model, sizes)
    grids = [GRIDS[(i + seed) % 3] for i in range(len(lengths))]  # 16, 6 and 15 vision tokens
    return make_qwen_batch(pruner.model, grids, lengths, seed=seed), [t * h * w // 4 for t, h, w in grids]


def alone(family: str, batch, i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a left-padded batch on its own, without padding (or padded tiles)."""
    if family in TILED:
        return tiled_alone(batch, i)
    if family != "llava":
        return qwen_alone(batch, i)
    keep = batch["attention_mask"][i].bool()
    return {k: v[i : i + 1, keep] if k != "pixel_values" else v[i : i + 1] for k, v in batch.items()}


def hf_embeddings(model, family: str, single) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded sample's input embeddings (1, N, C) built by Hugging Face's own ``get_input_embeddings`` and
    ``get_image_features`` (the projector's / merger's output at the image placeholders), and the vision mask (N,)."""
    embeds = model.get_input_embeddings()(single["input_ids"])
    if family == "llava":
        image = model.model.get_image_features(pixel_values=single["pixel_values"], return_dict=True)
    elif family in TILED:
        image = model.model.get_image_features(pixel_values=single["pixel_values"], image_sizes=single["image_sizes"])
    else:
        image = model.model.get_image_features(single["pixel_values"], single["image_grid_thw"])
    vision = single["input_ids"][0] == IMAGE_TOKEN
    embeds[0, vision] = torch.cat(list(image.pooler_output)).to(embeds.dtype)
    return embeds, vision


@pytest.mark.parametrize("family", FAMILIES)
def test_the_module_reads_the_projected_tokens_against_the_instruction_and_hf_runs_on_what_it_keeps(family):
    """Reference: the module applied to HF's own embeddings (vision tokens as queries, every other token of the
    prompt, the instruction, as keys/values) ranks the tokens; HF's language model on the prompt with only the
    top-k vision tokens, each at its original position (3-D on Qwen2.5-VL), gives the logits."""
    pruner = tower_pruner(family, seed=1, layers=(-1,), ratios=(0.4,))
    batch, counts = tower_batch(pruner, family, [(2, 6), (4, 3)], seed=1)
    with torch.no_grad():
        together = pruner(**batch)
        for i, after in enumerate((6, 3)):
            single = alone(family, batch, i)
            out = pruner(**single)
            embeds, vision = hf_embeddings(pruner.model, family, single)
            instruction = torch.ones(1, int((~vision).sum()), dtype=torch.bool)  # every text token: no answers
            gamma = pruner.decision_modules[0](embeds[:, vision], embeds[:, ~vision], instruction)
            kept = keep_scores(gamma)[0].topk(keep_count(0.4, counts[i])).indices.sort().values
            assert torch.equal(out.kept_vision[0][0], kept) and len(kept) < counts[i]
            if family not in ("llava", *TILED):
                expected = kept_embeddings_reference(pruner.model, single, kept)
            else:
                index = (~vision | torch.isin(torch.cumsum(vision.long(), 0) - 1, kept)).nonzero()[:, 0]
                expected = pruner.model(inputs_embeds=embeds[:, index], position_ids=index[None]).logits
            torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.logits[i, -after:], expected[0, -after:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_masks_equal_inference_removal_at_the_tower_stage(family, monkeypatch):
    """Hard decisions that keep what the learned removal kept (each sample its own k_b) mask (eq. 9, from decoder
    layer 0 on, multiplied into later stages as eq. 10) to the logits that removal gives (eqs. 13-14), with each
    sample's own keep fractions; the tower stage's scores are the same in both modes."""
    pruner = tower_pruner(family, seed=3)
    lengths = [(3, 4), (2, 6)]
    batch, counts = tower_batch(pruner, family, lengths, seed=3)
    gammas = []
    pruner.decision_modules[0].register_forward_hook(lambda m, i, o: gammas.append(o.detach()))
    with torch.no_grad():
        removed = pruner(**batch)
        decisions = decisions_of(removed.kept_vision, max(counts))
        monkeypatch.setattr(engine, "gumbel_decisions", lambda gamma, tau: decisions.pop(0))
        masked = pruner.train()(**batch)
    assert not decisions  # every stage took its decisions
    index = removed.token_index  # (B, N_out) positions (of the equalized layout) that survived
    for i, (_, after) in enumerate(lengths):  # the question after the image: real tokens at the end of both
        aligned = masked.logits[i].gather(0, index[i, -after:, None].expand(-1, masked.logits.shape[-1]))
        torch.testing.assert_close(aligned, removed.logits[i, -after:], atol=1e-4, rtol=1e-4)
        expected = [keep_count(r, counts[i]) / counts[i] for r in RATIOS]
        torch.testing.assert_close(masked.keep_fractions[i], torch.tensor(expected))
        torch.testing.assert_close(gammas[1][i, : counts[i]], gammas[0][i, : counts[i]], atol=1e-5, rtol=1e-5)
    # control: a different kept set at the tower stage changes the masked logits
    shifted = decisions_of(removed.kept_vision, max(counts))
    shifted[0] = shifted[0].roll(1, dims=1)
    monkeypatch.setattr(engine, "gumbel_decisions", lambda gamma, tau: shifted.pop(0))
    with torch.no_grad():
        other = pruner(**batch)
    assert not torch.allclose(other.logits[0, -1], masked.logits[0, -1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_prunes_and_generates_for_each_sample_what_it_gets_alone(family):
    pruner = tower_pruner(family, seed=2)
    batch, counts = tower_batch(pruner, family, [(2, 6), (4, 3), (1, 8)], seed=2)
    with torch.no_grad():
        together = pruner(**batch)
        for i in range(3):
            single = pruner(**alone(family, batch, i))
            for stage, ratio in enumerate(RATIOS):
                k = keep_count(ratio, counts[i])
                assert single.kept_vision[stage].shape[1] == k
                kept = together.kept_vision[stage][i]
                assert torch.equal(single.kept_vision[stage][0], kept[kept >= 0])
            torch.testing.assert_close(single.logits[0, -1], together.logits[i, -1], atol=1e-4, rtol=1e-4)
    new = pruner.generate(**batch, max_new_tokens=3, eos_token_id=[])
    for i in range(3):
        single = pruner.generate(**alone(family, batch, i), max_new_tokens=3, eos_token_id=[])
        assert torch.equal(new[i, -3:], single[0, -3:])


def cache_free_generate(pruner, batch, steps: int) -> torch.Tensor:
    """Re-run the pruned forward on the whole growing sequence, without a cache, and take the argmax (the
    instruction stays the prompt's: generation prunes once, in the prefill)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    instruction = mask.bool() & (ids != IMAGE_TOKEN)
    for _ in range(steps):
        out = pruner(input_ids=ids, attention_mask=mask, instruction_mask=instruction, **images)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
        instruction = torch.cat([instruction, torch.zeros_like(next_token, dtype=torch.bool)], 1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_matches_a_cache_free_rerun(family):
    pruner = tower_pruner(family, seed=5)
    batch, _ = tower_batch(pruner, family, [(3, 6), (1, 9)], seed=5)
    with torch.no_grad():
        expected = cache_free_generate(pruner, batch, steps=5)
    assert torch.equal(pruner.generate(**batch, max_new_tokens=5, eos_token_id=[]), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_training_step_reaches_the_tower_module_through_the_lm_loss(family):
    """With the ratio loss off, the tower module's only gradient is the LM loss through the masks of decoder layers
    0 on (straight-through, eqs. 5-9): every module gets a finite, non-zero one; the base model stays as it was and
    the vision tower does no backward work."""
    pruner = tower_pruner(family, seed=6, dtype=torch.bfloat16, lambda_ratio=0.0).train()
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    batch, _ = tower_batch(pruner, family, [(3, 6), (2, 8)], seed=6)
    answers = torch.full_like(batch["input_ids"], -100)
    answers[:, -3:] = batch["input_ids"][:, -3:]
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    first_layer = pruner.adapter.layers[0]
    seen = []
    first_layer.register_forward_hook(lambda m, i, o: seen.append((o if torch.is_tensor(o) else o[0]).requires_grad))
    optimizer = torch.optim.AdamW(pruner.decision_modules.parameters(), lr=1e-2)
    torch.manual_seed(0)
    out = pruner(**batch, labels=answers)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert seen == [True]  # decoder layer 0 already runs under the tower stage's masks
    for module in pruner.decision_modules:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
        assert module.score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pruner.model.parameters())
    optimizer.step()
    for k, v in pruner.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_activation_checkpointing_from_layer_0_gives_the_same_gradients():
    pruner = tower_pruner("llava", seed=8)
    batch, _ = tower_batch(pruner, "llava", [(3, 6), (2, 8)], seed=8)
    n = batch["input_ids"].shape[1]
    batch["labels"] = torch.where(torch.arange(n) >= n - 2, batch["input_ids"], -100)
    plain = gradients(pruner, batch, seed=8)
    pruner.activation_checkpointing_enable()
    for a, b in zip(plain, gradients(pruner, batch, seed=8)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(a.abs().sum() > 0 for a in plain[-2:])  # the last module's head


def test_checkpoint_round_trip_keeps_the_tower_stage(tmp_path):
    pruner = tower_pruner("llava_next", seed=7)
    save_decision_modules(pruner, tmp_path)
    assert read_pruning_config(tmp_path).layers == LAYERS
    loaded = load_decision_modules(tower_model("llava_next", seed=7), tmp_path).eval()
    assert loaded.config.layers == LAYERS
    batch, _ = tower_batch(pruner, "llava_next", [(2, 5), (4, 3)], seed=7)
    with torch.no_grad():
        expected, got = pruner(**batch), loaded(**batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=0, rtol=0)
    for a, b in zip(got.kept_vision, expected.kept_vision):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_analytic_equals_measured_with_a_tower_stage(family):
    """The tower module scores all |I_V| tokens against the text; every decoder layer sees k_0 + T tokens or fewer."""
    if family == "llava":
        config, size = tiny_llava_config(num_layers=5), None
    elif family in TILED:
        config = tiny_next_config("llama") if family == "llava_next" else tiny_onevision_config("qwen2")
        size = (20, 44)
    else:
        config, size = tiny_qwen_vl_config(family, num_layers=5), (56, 56)
    pruning = PruningConfig(layers=LAYERS, train_ratios=RATIOS, infer_ratios=(0.6, 0.3, 0.1), num_heads=4)
    report = analytic_flops(config, pruning, num_text_tokens=9, image_size=size)
    n, hidden = report.num_vision_tokens, config.text_config.hidden_size
    k = report.kept_vision_tokens
    num_layers = config.text_config.num_hidden_layers
    assert report.tokens_per_layer == tuple(v + 9 for v in (k[0], k[0], k[1], *[k[2]] * (num_layers - 3)))
    assert report.decision_per_stage[0] == decision_module_flops(hidden, n, 9, 2)
    measured = measure_flops(config, pruning, num_text_tokens=9, image_size=size)
    if family not in ("llava", *TILED):
        assert measured == report.pruned
    else:
        assert_close(measured, report.pruned)
    at_layer_0 = PruningConfig(layers=(0, 1, 2), num_heads=4, infer_ratios=(0.6, 0.3, 0.1))
    after_layer_0 = analytic_flops(config, at_layer_0, num_text_tokens=9, image_size=size)
    assert report.pruned < after_layer_0.pruned  # layer 0 runs on the kept tokens only


@pytest.mark.parametrize(
    "layers, message",
    [
        ((1, -1), "-1 after another stage"),
        ((-1, -1, 2), "-1 after another stage"),
        ((-2, 1, 2), "or -1 first"),
        ((-1, 2, 1), "strictly increasing"),
    ],
)
def test_the_tower_stage_is_only_the_first_and_errors_name_it(layers, message):
    with pytest.raises(ValueError, match=f"PruningConfig.layers.*{message}"):
        PruningConfig(layers=layers, train_ratios=RATIOS, infer_ratios=RATIOS)


def test_the_tower_modules_prune_only_at_their_own_stages():
    pruner = tower_pruner("llava")
    with torch.no_grad(), pytest.raises(ValueError, match="decision modules sit after layers \\[-1, 1, 2\\]"):
        pruner(**make_batch([(2, 3)]), layers=(0, 1, 2))
