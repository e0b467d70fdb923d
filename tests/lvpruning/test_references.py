"""Each training-free method against a slow, literal transcription of its paper's formula.

The reference runs one sample alone through the same weights with HF's eager attention (``output_attentions``) and
forward hooks on each decoder layer's sub-blocks, then evaluates the formula token by token in float64. The
engine runs a left-padded batch on SDPA. A first stage that keeps every token (ratio 1.0) leaves the sequence
whole, so the second stage's scores (TransPrune's TTV accumulated over three layers) have a reference too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvpruning.policies import PruningPolicy, get_policy
from lvpruning.stage import LayerRecord, StageInput
from tests.lvpruning.conftest import IMAGE_TOKEN, make_batch, make_pruner

LAYERS, RATIOS = (1, 3), (1.0, 0.5)
SUB_BLOCKS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class Recording(PruningPolicy):
    """Wraps a policy and keeps the scores it returned at each stage, by vision-token index (B, Nv)."""

    def __init__(self, inner: PruningPolicy):
        self.inner, self.seen = inner, []

    def recorded_layers(self, layers):
        return self.inner.recorded_layers(layers)

    def observe(self, record: LayerRecord) -> torch.Tensor:
        return self.inner.observe(record)

    def scores(self, stage: StageInput) -> torch.Tensor:
        scores = self.inner.scores(stage)
        self.seen.append(torch.zeros(scores.shape[0], stage.num_vision).scatter(1, stage.vision_index, scores))
        return scores


def eager_pass(model, input_ids, pixel_values):
    """Attention maps (layer -> (h, N, N)) and sub-block outputs ((layer, name) -> (N, C)) of one sample, float64."""
    outputs, hooks = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        for name in SUB_BLOCKS:

            def keep(module, args, out, key=(i, name)):
                outputs[key] = (out[0] if isinstance(out, tuple) else out)[0].double()

            hooks.append(getattr(layer, name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: a[0].double() for i, a in enumerate(out.attentions)}, outputs


def transprune_reference(maps, blocks, vision, question, layer, first):
    """TTV_j = sum over layers first..layer and over (attention, FFN) of ||y_j|| / ||x_j|| * softmax_j(1 - cos(x, y))
    (softmax over all the tokens), IGA_j = mean over heads and question tokens of the next layer's A[t, j];
    score_j = TTV_j / sum TTV + IGA_j / sum IGA."""
    ttv = dict.fromkeys(vision, 0.0)
    for l in range(first, layer + 1):  # noqa: E741
        for norm, block in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
            x, y = blocks[(l, norm)], blocks[(l, block)]
            change = [1.0 - F.cosine_similarity(x[n], y[n], dim=0).item() for n in range(x.shape[0])]
            total = sum(math.exp(c) for c in change)
            for j in vision:
                ttv[j] += (y[j].norm() / x[j].norm()).item() * math.exp(change[j]) / total
    A = maps[layer + 1]
    iga = {
        j: sum(A[h, t, j].item() for h in range(A.shape[0]) for t in question) / (A.shape[0] * len(question))
        for j in vision
    }
    return [ttv[j] / sum(ttv.values()) + iga[j] / sum(iga.values()) for j in vision]


def adaptinfer_reference(maps, blocks, vision, text, layer):
    """Per head, over the text after the image, P = A[text, text]; prior_t = sum_s (P + P^T - diag P)[s, t];
    score_j = sum_h sum_t prior_t A[t, j]."""
    A = maps[layer]
    scores = dict.fromkeys(vision, 0.0)
    for h in range(A.shape[0]):
        for t in text:
            prior = sum(A[h, s, t].item() + A[h, t, s].item() for s in text) - A[h, t, t].item()
            for j in vision:
                scores[j] += prior * A[h, t, j].item()
    return [scores[j] for j in vision]


def star_reference(maps, stage, vision, question, layer):
    """Stage 0: s_j = mean_h sum_{i in vision, i != j} A[i, j]. Later: s_j = mean_h mean_{t in question} A[t, j]."""
    A = maps[layer]
    H = A.shape[0]
    if stage == 0:
        return [sum(A[h, i, j].item() for h in range(H) for i in vision if i != j) / H for j in vision]
    return [sum(A[h, t, j].item() for h in range(H) for t in question) / (H * len(question)) for j in vision]


def reference_scores(name, maps, blocks, stage, input_ids):
    ids = input_ids.tolist()
    vision = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN]
    text = [t for t in range(len(ids)) if t not in vision]
    question = [t for t in text if t > vision[-1]]
    layer = LAYERS[stage]
    if name == "transprune":
        return transprune_reference(maps, blocks, vision, question, layer, LAYERS[0])
    if name == "adaptinfer":
        return adaptinfer_reference(maps, blocks, vision, question, layer)
    return star_reference(maps, stage, vision, question, layer)


@pytest.mark.parametrize("name", ["transprune", "adaptinfer", "star"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_the_literal_formula(name, seed):
    pruner = make_pruner(seed)
    eager = make_pruner(seed, attn="eager").model  # the same weights, eager attention maps
    batch = make_batch([(2, 5), (4, 9)], seed=seed)  # left padded
    policy = Recording(get_policy(name))
    with torch.no_grad():
        pruner(**batch, policy=policy, layers=LAYERS, keep_ratios=RATIOS)
    assert len(policy.seen) == 2
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        input_ids = batch["input_ids"][b : b + 1, keep]
        maps, blocks = eager_pass(eager, input_ids, batch["pixel_values"][b : b + 1])
        for stage in range(2):
            expected = torch.tensor(reference_scores(name, maps, blocks, stage, input_ids[0]), dtype=torch.float64)
            torch.testing.assert_close(policy.seen[stage][b].double(), expected, rtol=1e-4, atol=1e-6)
