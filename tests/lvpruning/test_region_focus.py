"""LRS-VQA's Region Focus Module on a tiny LLaVA-NeXT with a Qwen2 decoder (LRS-VQA's own base), against Hugging
Face's eager attention weights and a literal transcription of the reference's loss (per sample, layer and head,
``F.kl_div(..., 'batchmean')`` and ``F.mse_loss``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Model

from lvpruning.flops import count_flops
from lvpruning.region_focus import (
    CONFIG_NAME,
    RegionFocusModule,
    answer_rows,
    distillation_loss,
    load_region_focus,
    region_focus_flops,
    save_region_focus,
    teacher_logits,
)
from lvpruning.tiny import tiny_llava, tiny_tiled_config

LAYERS = (2, 4)  # the module copies LLM layers 1, 2 and 4
LENGTHS = (14, 9, 12)  # real tokens per sample, left-padded to 14
VISION = (3, 9)  # the vision tokens sit at the last 11 positions - [3, 9) of each sample's own span


def tiny_next(attn: str = "sdpa", seed: int = 3, hidden_size: int = 64):
    config = tiny_tiled_config("llava_next", "qwen2", num_layers=6, hidden_size=hidden_size, initializer_range=0.2)
    return tiny_llava(config, seed=seed, attn_implementation=attn)


def inputs(model, seed: int = 0):
    """Random embeddings (B, N, C), left-padded, with positions, padding, the last token and the vision tokens."""
    g = torch.Generator().manual_seed(seed)
    B, N, C = len(LENGTHS), max(LENGTHS), model.config.text_config.hidden_size
    embeds = torch.randn(B, N, C, generator=g)
    padding = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        padding[b, N - n :] = True
    position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)
    last = torch.full((B,), N - 1)
    vision_pos = torch.stack([torch.arange(N - n + VISION[0], N - n + VISION[1]) for n in LENGTHS])  # (B, V)
    vision_valid = torch.ones_like(vision_pos, dtype=torch.bool)
    vision_valid[1, -2:] = False  # sample 1 has fewer vision tokens: two empty slots
    return embeds, position_ids, padding, last, vision_pos, vision_valid


def hf_reference_attentions(model, embeds, position_ids, padding, layers):
    """Hugging Face's eager attention weights (each (B, h, N, N)) of a Qwen2Model made of the LLM's layers
    ``[layers[0] - 1, *layers]``."""
    config = model.config.text_config.__class__.from_dict(model.config.text_config.to_dict())
    config.num_hidden_layers = len(layers) + 1
    config.layer_types = config.layer_types[: len(layers) + 1]
    ref = Qwen2Model._from_config(config, attn_implementation="eager").eval()
    base = model.model.language_model.layers
    for i, j in enumerate((layers[0] - 1, *layers)):
        ref.layers[i].load_state_dict(base[j].state_dict())
    out = ref(inputs_embeds=embeds, attention_mask=padding.long(), position_ids=position_ids, output_attentions=True)
    return out.attentions


def visible(padding, queries):
    """(B, Q, N) True where a query row may attend: not padding, not later."""
    N = padding.shape[1]
    return (torch.arange(N)[None, None, :] <= queries[..., None]) & padding[:, None, :]


def masked_probs(logits, padding, queries):
    return logits.masked_fill(~visible(padding, queries)[:, None], float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_module_logits_and_scores_equal_hf_eager_attention_of_the_copied_layers(attn):
    model = tiny_next(attn)
    embeds, position_ids, padding, last, vision_pos, vision_valid = inputs(model)
    module = RegionFocusModule(model, LAYERS)
    queries = torch.stack([last, last - 1, last - 4], dim=1)  # (B, 3)
    with torch.no_grad():
        S = module(embeds, position_ids, padding, queries)
        score = module.score(embeds, position_ids, padding, last, vision_pos, vision_valid)
        attentions = hf_reference_attentions(model, embeds, position_ids, padding, LAYERS)
    for k, S_k in enumerate(S):  # S_k: module layer k + 1 on the hidden after module layer k
        want = attentions[k + 1].gather(2, queries[:, None, :, None].expand(-1, S_k.shape[1], -1, S_k.shape[-1]))
        torch.testing.assert_close(masked_probs(S_k, padding, queries), want, atol=1e-5, rtol=1e-4)
    # The score: the last row of the last layer, renormalised over the valid vision tokens, mean over heads.
    row = attentions[-1][torch.arange(3), :, last]  # (B, h, N)
    for b in range(3):
        p = row[b][:, vision_pos[b][vision_valid[b]]]
        want = (p / p.sum(-1, keepdim=True)).mean(0)
        torch.testing.assert_close(score[b][vision_valid[b]], want, atol=1e-6, rtol=1e-4)
        assert bool((score[b][~vision_valid[b]] == 0).all())
    # A mutation control: the previous layer's row ranks the tokens differently.
    other = attentions[-2][torch.arange(3), :, last][0][:, vision_pos[0]]
    assert not torch.allclose(score[0], (other / other.sum(-1, keepdim=True)).mean(0), atol=1e-3)


def test_teacher_logits_equal_hf_eager_attention_of_the_frozen_llm():
    model = tiny_next("eager")
    embeds, position_ids, padding, last, *_ = inputs(model, seed=1)
    queries = torch.stack([last, last - 2], dim=1)
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=padding.long(),
            position_ids=position_ids,
            output_attentions=True,
            output_hidden_states=True,
        )
    T = teacher_logits(model, LAYERS, out.hidden_states, position_ids, queries)
    for r, T_r in zip(LAYERS, T, strict=True):
        want = out.attentions[r].gather(2, queries[:, None, :, None].expand(-1, T_r.shape[1], -1, T_r.shape[-1]))
        torch.testing.assert_close(masked_probs(T_r, padding, queries), want, atol=1e-5, rtol=1e-4)


def literal_reference_loss(S, T, row_counts, key_counts, image_spans):
    """The reference's loop, written out: per sample (its own rows and keys, unpadded), per layer not in {1, 2},
    per head, ``kl_div(log_softmax(S), softmax(T), 'batchmean')`` over the keys, the same at T = 2 and
    ``mse_loss(S / 2, T / 2)`` over the image keys; the plain mean of the list."""
    losses = []
    for b, (q, n, (i0, i1)) in enumerate(zip(row_counts, key_counts, image_spans, strict=True)):
        if i1 == i0:
            continue  # a sample without an image
        for layer in range(len(S)):
            if layer in [1, 2]:
                continue
            out_attn, target_attn = S[layer][b, :, :q, :n], T[layer][b, :, :q, :n]
            for head in range(out_attn.shape[0]):
                losses.append(
                    F.kl_div(
                        F.log_softmax(out_attn[head], dim=-1),
                        F.softmax(target_attn[head], dim=-1),
                        reduction="batchmean",
                    )
                )
                s = out_attn[head][:, i0:i1] / 2.0
                t = target_attn[head][:, i0:i1] / 2.0
                losses.append(F.kl_div(F.log_softmax(s, dim=-1), F.softmax(t, dim=-1), reduction="batchmean"))
                losses.append(F.mse_loss(s, t, reduction="mean"))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distillation_loss_equals_the_reference_loop(dtype):
    g = torch.Generator().manual_seed(5)
    B, h, Q, N, K = 4, 3, 3, 20, 4
    S = [(3 * torch.randn(B, h, Q, N, generator=g)).to(dtype).requires_grad_() for _ in range(K)]
    T = [(3 * torch.randn(B, h, Q, N, generator=g)).to(dtype) for _ in range(K)]
    row_counts, key_counts, image_spans = (3, 1, 2, 3), (20, 15, 17, 12), ((4, 12), (2, 9), (5, 5), (0, 12))
    rows = torch.arange(Q)[None, :] < torch.tensor(row_counts)[:, None]
    keys = torch.arange(N)[None, :] < torch.tensor(key_counts)[:, None]
    image = torch.stack([(torch.arange(N) >= i0) & (torch.arange(N) < i1) for i0, i1 in image_spans])
    loss = distillation_loss(S, T, rows, keys, image)
    want = literal_reference_loss([s.float() for s in S], [t.float() for t in T], row_counts, key_counts, image_spans)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert S[1].grad is None and S[2].grad is None  # the skipped layers
    assert all(bool(S[k].grad.isfinite().all()) and S[k].grad.abs().sum() > 0 for k in (0, 3))
    assert bool((S[0].grad[2] == 0).all())  # the sample without an image
    # Mutation controls: a tau^2 factor, or no skipped layers, gives another value.
    assert not torch.isclose(distillation_loss(S, T, rows, keys, image, skipped=()), want, rtol=1e-3)
    assert not torch.isclose(distillation_loss(S, T, rows, keys, image, temperature=1.0), want, rtol=1e-3)


def test_training_reaches_the_copies_only_and_leaves_the_llm_untouched():
    model = tiny_next()
    model.requires_grad_(False)
    embeds, position_ids, padding, last, vision_pos, vision_valid = inputs(model, seed=2)
    module = RegionFocusModule(model, (2, 3, 4, 5))  # S_0 and S_3 enter the loss, S_1 and S_2 are skipped
    base = model.model.language_model.layers
    for copy_, j in zip(module.layers, (1, 2, 3, 4, 5), strict=True):  # initialised from the LLM's own layers
        for (name, p), q in zip(copy_.named_parameters(), base[j].parameters(), strict=True):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    queries = last[:, None]
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=embeds, attention_mask=padding.long(), position_ids=position_ids, output_hidden_states=True
        )
    T = teacher_logits(model, module.llm_layers, out.hidden_states, position_ids, queries)
    image = torch.zeros_like(padding).scatter(1, vision_pos, True)
    # The copies of layers 0..4 on the embeddings are the LLM itself: nothing to distil.
    whole = RegionFocusModule(model, (1, 2, 3, 4))
    T_whole = teacher_logits(model, whole.llm_layers, out.hidden_states, position_ids, queries)
    zero = distillation_loss(whole(embeds, position_ids, padding, queries), T_whole, queries >= 0, padding, image)
    assert zero.abs() < 1e-6
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = distillation_loss(module(embeds, position_ids, padding, queries), T, queries >= 0, padding, image)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert module.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert module.layers[-1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert module.layers[-1].mlp.up_proj.weight.grad is None  # layer K is never run
    opt.step()
    after = distillation_loss(module(embeds, position_ids, padding, queries), T, queries >= 0, padding, image)
    assert loss > 1e-3 and after < loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_save_and_load_give_the_same_scores_and_refuse_another_model(tmp_path):
    model = tiny_next()
    embeds, position_ids, padding, last, vision_pos, vision_valid = inputs(model, seed=3)
    module = RegionFocusModule(model, LAYERS)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained": no longer the LLM's own weights
        want = module.score(embeds, position_ids, padding, last, vision_pos, vision_valid)
    save_region_focus(module, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["layers"] == list(LAYERS) and meta["model"]["hidden_size"] == 64
    loaded = load_region_focus(tiny_next(seed=9), tmp_path)
    with torch.no_grad():
        got = loaded.score(embeds, position_ids, padding, last, vision_pos, vision_valid)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden_size=64"):
        load_region_focus(tiny_next(hidden_size=32), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{")
    with pytest.raises(ValueError, match=CONFIG_NAME):
        load_region_focus(model, tmp_path)


def test_bf16_scores_follow_the_fp32_reference():
    model = tiny_next("eager")
    embeds, position_ids, padding, last, vision_pos, vision_valid = inputs(model, seed=4)
    with torch.no_grad():
        attentions = hf_reference_attentions(model, embeds, position_ids, padding, LAYERS)
        module = RegionFocusModule(model.bfloat16(), LAYERS)
        score = module.score(embeds.bfloat16(), position_ids, padding, last, vision_pos, vision_valid)
    assert score.dtype == torch.float32
    row = attentions[-1][torch.arange(3), :, last]
    for b in range(3):
        p = row[b][:, vision_pos[b][vision_valid[b]]]
        want = (p / p.sum(-1, keepdim=True)).mean(0)
        torch.testing.assert_close(score[b][vision_valid[b]], want, atol=0.03, rtol=0.1)  # measured: 0.015 at most


def test_layers_must_be_increasing_with_a_predecessor():
    model = tiny_next()
    for layers in [(0, 2), (3, 2), (2, 6), ()]:
        with pytest.raises(ValueError, match="increasing"):
            RegionFocusModule(model, layers)


def test_answer_rows_are_the_tokens_before_each_answer_span():
    labels = torch.full((3, 12), -100)
    labels[0, 5:7] = 9  # one turn
    labels[0, 9:12] = 8  # a second one
    labels[1, 11] = 7  # an answer of one token at the end
    padding = torch.ones(3, 12, dtype=torch.bool)
    padding[2, :4] = False  # sample 2: left-padded, no answer
    rows, real = answer_rows(labels, padding)

    def literal(label):  # the reference's loop, without its Qwen2-template guard (index > 13)
        found = [i - 1 for i in torch.where(label != -100)[0].tolist() if label[i - 1] == -100]
        return found or [len(label) - 1]

    for b in range(3):
        assert rows[b][real[b]].tolist() == literal(labels[b])
    assert rows.tolist()[0] == [4, 8] and real.tolist() == [[True, True], [True, False], [True, False]]


def test_flops_of_scoring_and_of_the_training_rows_equal_the_counted_matmuls():
    model = tiny_next()
    embeds, position_ids, padding, last, vision_pos, vision_valid = inputs(model)
    module = RegionFocusModule(model, LAYERS)
    args = {
        "inputs_embeds": embeds,
        "position_ids": position_ids,
        "padding": padding,
        "last": last,
        "vision_pos": vision_pos,
        "vision_valid": vision_valid,
    }
    measured = count_flops(module.score, args)
    B, N = embeds.shape[:2]
    assert measured == B * region_focus_flops(model.config.text_config, len(LAYERS), N)
    rows = {"inputs_embeds": embeds, "position_ids": position_ids, "padding": padding, "queries": last[:, None]}
    S = count_flops(module, rows)
    assert S == B * region_focus_flops(model.config.text_config, len(LAYERS), N, every_layer=True)
