"""The LLM-side methods (TransPrune, AdaptInfer) against slow, literal transcriptions of their formulas, at both
stages: the second after the first has removed half the vision tokens.

The reference runs one sample alone through the same weights with HF's eager attention (``output_attentions``) and
forward hooks on each decoder layer's sub-blocks, then evaluates the formula token by token in float64, keeps its
own top-k and runs the remaining layers on the kept tokens at their original positions (again eager, hooked). So the
second stage checks TransPrune's TTV realigned to the kept tokens (the pruning layer's values from the full
sequence, the later layers' from the pruned one) and each method's attention on a pruned sequence. The engine runs
a left-padded batch on SDPA. A changed formula fails the comparison (``test_a_wrong_formula_fails_the_comparison``).
STAR's two stages are checked in ``test_tower_references.py`` (its first stage is at the vision tower).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lvpruning.policies import PruningPolicy, get_policy
from lvpruning.stage import LayerRecord, StageInput
from tests.lvpruning.conftest import IMAGE_TOKEN, make_batch, make_pruner

LAYERS, RATIOS = (1, 3), (0.5, 0.25)  # 32, then 16 of the 64 vision tokens
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


def eager_pass(language_model, first, **inputs):
    """Decoder layers ``first``.. of the language model on ``inputs`` (HF eager): attention maps (layer -> (h, N, N)),
    sub-block outputs ((layer, name) -> (N, C)) and hidden states (index i: the input of layer ``first + i``), one
    sample, float64."""
    layers = language_model.layers
    outputs, hooks = {}, []
    for i, layer in enumerate(layers[first:], start=first):
        for name in SUB_BLOCKS:

            def keep(module, args, out, key=(i, name)):
                outputs[key] = (out[0] if isinstance(out, tuple) else out)[0].double()

            hooks.append(getattr(layer, name).register_forward_hook(keep))
    language_model.layers = nn.ModuleList(list(layers)[first:])
    try:
        with torch.no_grad():
            out = language_model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        language_model.layers = layers
        for hook in hooks:
            hook.remove()
    maps = {first + i: a[0].double() for i, a in enumerate(out.attentions)}
    return maps, outputs, out.hidden_states


def ttv(blocks, layer, positions):
    """TTV_j of one layer, sum over (attention, FFN) of ||y_j|| / ||x_j|| * exp(1 - cos(x_j, y_j)) / sum_n exp(1 -
    cos(x_n, y_n)), n over all the tokens the layer saw; for the rows ``positions``."""
    out = dict.fromkeys(positions, 0.0)
    for norm, block in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
        x, y = blocks[(layer, norm)], blocks[(layer, block)]
        change = [1.0 - F.cosine_similarity(x[n], y[n], dim=0).item() for n in range(x.shape[0])]
        total = sum(math.exp(c) for c in change)
        for j in positions:
            out[j] += (y[j].norm() / x[j].norm()).item() * math.exp(change[j]) / total
    return out


def iga(A, vision, question):
    """IGA_j = mean over heads and question tokens of A[t, j] (the next layer's attention)."""
    H = A.shape[0]
    return {j: sum(A[h, t, j].item() for h in range(H) for t in question) / (H * len(question)) for j in vision}


def adaptinfer(A, vision, question, variant=""):
    """Per head, over the question tokens, P = A[text, text]; prior_t = sum_s (P + P^T - diag P)[s, t]; score_j =
    sum_h sum_t prior_t A[t, j]. Variant "no symmetrisation": prior_t = sum_s P[s, t]."""
    scores = dict.fromkeys(vision, 0.0)
    for h in range(A.shape[0]):
        for t in question:
            prior = sum(A[h, s, t].item() for s in question)
            if variant != "no symmetrisation":
                prior += sum(A[h, t, s].item() for s in question) - A[h, t, t].item()
            for j in vision:
                scores[j] += prior * A[h, t, j].item()
    return scores


def transprune(ttv_total, iga_j, vision):
    """score_j = TTV_j / sum TTV + IGA_j / sum IGA over the kept vision tokens."""
    t, g = sum(ttv_total[j] for j in vision), sum(iga_j[j] for j in vision)
    return {j: ttv_total[j] / t + iga_j[j] / g for j in vision}


def reference(name, model, input_ids, pixel_values, variant=""):
    """Both stages of ``name`` on one sample: scores by vision index {j: s_j}, per stage, each stage keeping the
    reference's own top-k. Variants: "TTV not realigned" (TransPrune), the pruning layer's TTV read at the first k
    vision positions of the full sequence instead of the kept tokens'; "renumbered", the pruned sequence at
    positions 0..N'-1 (as the reference code renumbers) instead of the original ones."""
    lm = model.model.language_model
    ids = input_ids.tolist()
    vision = [n for n, t in enumerate(ids) if t == IMAGE_TOKEN]
    question = [n for n in range(len(ids)) if n > vision[-1]]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids[None])
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        embeds[0, vision] = torch.cat(list(features)).to(embeds.dtype)
    maps, blocks, states = eager_pass(lm, 0, inputs_embeds=embeds)
    first, second = LAYERS
    if name == "transprune":
        ttv_first = ttv(blocks, first, vision)
        stage0 = transprune(ttv_first, iga(maps[first + 1], vision, question), vision)
    else:
        stage0 = adaptinfer(maps[first], vision, question, variant)
    k0 = math.floor(RATIOS[0] * len(vision))
    kept = sorted(sorted(vision, key=stage0.get, reverse=True)[:k0])
    rows = [n for n in range(len(ids)) if n not in vision or n in kept]  # original positions of the pruned sequence
    hidden = states[first + 1][:, rows]  # the pruning layer's output
    positions = torch.tensor([list(range(len(rows))) if variant == "renumbered" else rows])
    maps, blocks, _ = eager_pass(lm, first + 1, inputs_embeds=hidden, position_ids=positions)
    at = {n: r for r, n in enumerate(rows)}  # original position -> row in the pruned sequence
    kept_rows, question_rows = [at[n] for n in kept], [at[n] for n in question]
    if name == "transprune":
        total = {n: ttv_first[vision[i] if variant == "TTV not realigned" else n] for i, n in enumerate(kept)}
        for layer in range(first + 1, second + 1):
            later = ttv(blocks, layer, kept_rows)
            total = {n: total[n] + later[at[n]] for n in kept}
        guide = iga(maps[second + 1], kept_rows, question_rows)
        stage1 = transprune(total, {n: guide[at[n]] for n in kept}, kept)
    else:
        scores = adaptinfer(maps[second], kept_rows, question_rows, variant)
        stage1 = {n: scores[at[n]] for n in kept}
    by_index = [{vision.index(n): s for n, s in stage.items()} for stage in (stage0, stage1)]
    return by_index


def run_engine(name, seed):
    pruner = make_pruner(seed)
    batch = make_batch([(2, 5), (4, 9)], seed=seed)  # left padded
    policy = Recording(get_policy(name))
    with torch.no_grad():
        out = pruner(**batch, policy=policy, layers=LAYERS, keep_ratios=RATIOS)
    assert len(policy.seen) == 2
    return batch, policy.seen, out.kept_vision


def sample(batch, b):
    keep = batch["attention_mask"][b].bool()
    return batch["input_ids"][b, keep], batch["pixel_values"][b : b + 1]


def assert_scores(seen, b, expected):
    """The engine's scores of sample ``b`` at the reference's vision tokens equal the reference's."""
    index = sorted(expected)
    got = seen[b, index].double()
    torch.testing.assert_close(
        got, torch.tensor([expected[j] for j in index], dtype=torch.float64), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name", ["transprune", "adaptinfer"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_the_literal_formula_before_and_after_removal(name, seed):
    batch, seen, kept = run_engine(name, seed)
    eager = make_pruner(seed, attn="eager").model  # the same weights, eager attention maps
    for b in range(2):
        expected = reference(name, eager, *sample(batch, b))
        for stage in range(2):
            assert_scores(seen[stage], b, expected[stage])
            k = kept[stage].shape[1]
            assert set(kept[stage][b].tolist()) == set(sorted(expected[stage], key=expected[stage].get)[-k:])


@pytest.mark.parametrize(
    "name, variant, stage",
    [
        ("transprune", "TTV not realigned", 1),
        ("transprune", "renumbered", 1),
        ("adaptinfer", "renumbered", 1),
        ("adaptinfer", "no symmetrisation", 0),
    ],
)
def test_a_wrong_formula_fails_the_comparison(name, variant, stage):
    """A changed formula in the reference breaks the comparison (after removal: stage 1) that the right one passes."""
    batch, seen, _ = run_engine(name, 0)
    eager = make_pruner(0, attn="eager").model
    assert_scores(seen[stage], 0, reference(name, eager, *sample(batch, 0))[stage])
    with pytest.raises(AssertionError, match="not close"):
        assert_scores(seen[stage], 0, reference(name, eager, *sample(batch, 0), variant)[stage])
