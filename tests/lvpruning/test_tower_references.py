"""The vision-tower methods (VisionZip, VScan, VFlowOpt, STAR's first stage) against slow, literal transcriptions of
their formulas.

The reference runs one sample alone through the same weights in float64 with HF's eager attention, reading the
CLIP maps from ``output_attentions``, the hidden states from ``output_hidden_states`` and the keys from a hook on
``k_proj``, then evaluates the formula token by token with python loops and sets. The engine runs a left-padded
batch on SDPA; a wrapper records what ``plan`` returned. The tower has 4 CLIP layers, so the shallow layer (0),
the feature layer (2) and the last one (3) differ.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from lvpruning import PruningConfig, attach
from lvpruning.policies import PruningPolicy, get_policy
from lvpruning.policies.star import StarPolicy
from lvpruning.policies.vflowopt import VFlowOptPolicy
from lvpruning.stage import StageInput
from lvpruning.tiny import tiny_llava, tiny_llava_config
from tests.lvpruning.conftest import IMAGE_TOKEN, VOCAB, make_batch

GRID, P = 8, 64
LENGTHS = [(2, 5), (4, 9), (3, 3)]  # left padded


class Recording(PruningPolicy):
    """Wraps a policy; keeps per stage what ``plan`` returned: kept vision indices (B, k), hidden, values, and at
    the LLM stages the scores, by vision index (B, Nv)."""

    def __init__(self, inner: PruningPolicy):
        self.inner, self.plans, self.scores_seen = inner, [], []

    def recorded_layers(self, layers):
        return self.inner.recorded_layers(layers)

    def check_layers(self, layers):
        self.inner.check_layers(layers)

    def plan(self, stage: StageInput, k: int):
        plan = self.inner.plan(stage, k)
        self.plans.append((stage.vision_index.gather(1, plan.keep), plan.hidden, plan.values))
        if stage.layer >= 0 or isinstance(self.inner, StarPolicy):  # STAR ranks by scores at the tower too
            scores = self.inner.scores(stage)
            self.scores_seen.append(torch.zeros(scores.shape[0], P).scatter(1, stage.vision_index, scores))
        return plan


def build(seed: int, attn: str = "sdpa"):
    return tiny_llava(tiny_llava_config(num_layers=5, vocab_size=VOCAB, vision_layers=4), seed, attn)


def run_engine(policy, seed, layers, ratios):
    pruning = PruningConfig(layers=(0, 1, 2), train_ratios=(0.5, 0.3, 0.1), infer_ratios=(0.5, 0.3, 0.1))
    pruner, batch, rec = attach(build(seed), pruning).eval(), make_batch(LENGTHS, seed=seed), Recording(policy)
    with torch.no_grad():
        pruner(**batch, policy=rec, layers=layers, keep_ratios=ratios)
    return batch, rec


def tower_pass(model, pixel_values):
    """CLIP attention maps (h, M, M), hidden states (M, C_v) and head-mean keys (M, d) of one image, float64."""
    keys = []
    layers = model.model.vision_tower.encoder.layers
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out[0])) for layer in layers]
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values.double(), output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    heads = out.attentions[0].shape[1]
    keys = [k.view(k.shape[0], heads, -1).mean(dim=1) for k in keys]
    return [a[0] for a in out.attentions], [h[0] for h in out.hidden_states], keys


def cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def project(model, h):
    with torch.no_grad():
        return model.model.multi_modal_projector(h[None])[0]


def visionzip_reference(model, pixels, k, variant=""):
    """s_j = sum_h A[CLS, j] (layer -2); CLS + top (D - 1) patches; the other Nf patches: targets every Nf // K,
    the rest join argmax_c cos(kbar_i, kbar_t_c); contextual_c = H[t_c] + mean H[i]. Slot -> projected state."""
    A, states, keys = tower_pass(model, pixels)
    A, H, K = A[-2], states[-2], keys[-2]
    n_ctx = min(k - 1, round(k * 10 / 64))
    s = {j: sum(A[h, 0, j].item() for h in range(A.shape[0])) for j in range(1, P + 1)}
    dominant = sorted(s, key=s.get, reverse=True)[: k - n_ctx - 1]  # tower indices
    remaining = [j for j in range(1, P + 1) if j not in dominant]
    targets = remaining[:: max(1, len(remaining) // n_ctx)][:n_ctx]
    members = {t: [] for t in targets}
    for i in remaining:
        if i not in targets:
            members[max(targets, key=lambda t: cos(K[i], K[t]))].append(i)  # ties: the first
    out = {j - 1: project(model, H[j]) for j in dominant}
    for t, group in members.items():
        if variant == "mean including the target":
            ctx = sum((H[i] for i in group), H[t]) / (1 + len(group))
        else:
            ctx = H[t] + (sum(H[i] for i in group) / len(group) if group else 0)
        out[t - 1] = project(model, ctx)
    out[min(set(range(P)) - set(out))] = project(model, H[0])  # CLS at the first free slot
    return out


def vscan_reference(model, pixels, k, variant=""):
    """a_l = mean_h A_l[CLS, patches]; top (k // 2) // 16 by a_0 in each 2 x 2 window of the 8 x 8 grid, then the
    top (k - local) by a_feature among the rest; each dropped x_u joins argmax_j cos(x_u, x_j), and
    x'_j = (x_j + sum x_u) / (1 + n_j). Slot -> merged state."""
    A, states, _ = tower_pass(model, pixels)
    heads = A[0].shape[0]
    shallow = {j: sum(A[0][h, 0, j + 1].item() for h in range(heads)) / heads for j in range(P)}
    deep = {j: sum(A[-2][h, 0, j + 1].item() for h in range(heads)) / heads for j in range(P)}
    x = project(model, states[-2][1:])
    per_window, side = k // 2 // 16, GRID // 4
    local = []
    for wy in range(4):
        for wx in range(4):
            window = [(wy * side + r) * GRID + wx * side + c for r in range(side) for c in range(side)]
            local += sorted(window, key=shallow.get, reverse=True)[:per_window]
    kept = local + sorted(set(range(P)) - set(local), key=deep.get, reverse=True)[: k - len(local)]
    merged = {j: [] for j in kept}
    for u in set(range(P)) - set(kept):
        merged[max(sorted(kept), key=lambda j: cos(x[u], x[j]))].append(u)
    if variant == "kept token excluded":
        return {j: sum(x[u] for u in us) / len(us) if us else x[j] for j, us in merged.items()}
    return {j: (x[j] + sum(x[u] for u in us)) / (1 + len(us)) for j, us in merged.items()}


def entropy(pixels):
    """Base-2 entropy of each patch's 256-bin histogram of round(mean_c (x_c * std_c + mean_c) * 255), clamped."""
    out, p = [], pixels.shape[-1] // GRID
    for j in range(P):
        counts = {}
        for y in range(j // GRID * p, j // GRID * p + p):
            for xx in range(j % GRID * p, j % GRID * p + p):
                level = sum(
                    (pixels[c, y, xx].item() * OPENAI_CLIP_STD[c] + OPENAI_CLIP_MEAN[c]) * 255 for c in range(3)
                )
                level = min(255, max(0, round(level / 3)))
                counts[level] = counts.get(level, 0) + 1
        out.append(-sum(n / p**2 * math.log2(n / p**2) for n in counts.values()))
    return out


def vflowopt_reference(model, pixels, k, t, alpha, cell, variant=""):
    """Abar = mean_h A (layer -2, all M tokens); r_j = mean_i Abar[i, j]; G = {j: r_j > t M / 729 mean r};
    s_j = mean_{g in G} Abar[g, j] + alpha softmax_j(entropy). The least D >= k - cells with D + (cells the other
    patches fill) >= k top patches kept; each filled cell -> its s-weighted mean at its best member's slot, the
    best-scored k - D of them kept. Returns (slot -> state, slot -> s)."""
    A, states, _ = tower_pass(model, pixels)
    A = A[-2].mean(dim=0)
    M = A.shape[0]
    r = [sum(A[i, j].item() for i in range(M)) / M for j in range(M)]
    G = [j for j in range(M) if r[j] > t * M / 729 * sum(r) / M]
    assert 0 < len(G) < M, len(G)
    c = [sum(A[g, j].item() for g in G) / len(G) for j in range(1, M)]
    ent = entropy(pixels[0].double())
    s = [c[j] + alpha * math.exp(ent[j]) / sum(map(math.exp, ent)) for j in range(P)]
    size = cell * GRID / 27
    cell_of = [(math.floor(j // GRID / size), math.floor(j % GRID / size)) for j in range(P)]
    order = sorted(range(P), key=lambda j: s[j], reverse=True)
    D = max(0, k - len(set(cell_of)))
    while D + len({cell_of[j] for j in order[D:]}) < k:
        D += 1
    x = project(model, states[-2][1:])
    out = {j: x[j] for j in order[:D]}
    recycled = {}
    for g in {cell_of[j] for j in order[D:]}:
        group = [j for j in order[D:] if cell_of[j] == g]
        w = [1.0] * len(group) if variant == "unweighted cells" else [max(s[j], 0.0) for j in group]
        w = w if sum(w) > 0 else [1.0] * len(group)  # no positive weight (alpha < 0): a plain mean
        recycled[max(group, key=lambda j: s[j])] = sum(wi * x[j] for wi, j in zip(w, group)) / sum(w)
    for j in sorted(recycled, key=lambda j: s[j], reverse=True)[: k - D]:
        out[j] = recycled[j]
    return out, {j: s[j] for j in out}


def sample(batch, b):
    keep = batch["attention_mask"][b].bool()
    return batch["input_ids"][b, keep], batch["pixel_values"][b : b + 1]


def assert_plan(plan, b, expected):
    """The engine's kept set and per-slot hidden states at the tower stage equal the reference's."""
    keep, hidden, _ = plan
    assert set(keep[b].tolist()) == set(expected)
    got = dict(zip(keep[b].tolist(), hidden[b].double()))
    torch.testing.assert_close(
        torch.stack([got[j] for j in sorted(expected)]),
        torch.stack([expected[j] for j in sorted(expected)]),
        rtol=1e-4,
        atol=1e-6,
    )


def llm_scores(model, ids, tower_out, layer, queries="last"):
    """Mean over heads, and over the ``queries`` (the last token, or the question: the text after the image), of the
    attention they pay each kept vision token in decoder ``layer`` (HF eager ``output_attentions``), on the sequence
    after the tower stage with the original positions."""
    vision = [n for n, t in enumerate(ids.tolist()) if t == IMAGE_TOKEN]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    rows = [n for n in range(len(ids)) if n not in vision or vision.index(n) in tower_out]
    seq = torch.stack([tower_out[vision.index(n)] if n in vision else embeds[n] for n in rows])
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=seq[None], position_ids=torch.tensor([rows]), output_attentions=True
        )
    A = out.attentions[layer][0]
    asking = [len(rows) - 1] if queries == "last" else [r for r, n in enumerate(rows) if n > vision[-1]]
    return {vision.index(n): A[:, asking, q].mean().item() for q, n in enumerate(rows) if n in vision}


def star_reference(model, pixels, variant=""):
    """H_v = the projected features (layer -2, CLS dropped); A[i, j] = exp(<h_i, h_j> / sqrt d) / sum_k exp(<h_i,
    h_k> / sqrt d); r_j = (1 / |V|) sum_i A[i, j]. Returns (slot -> H_v, slot -> r)."""
    _, states, _ = tower_pass(model, pixels)
    H = project(model, states[-2][1:])
    d = H.shape[1]
    A = []
    for i in range(P):
        logits = [(H[i] @ H[j]).item() / math.sqrt(d) for j in range(P)]
        e = [math.exp(x - max(logits)) for x in logits]
        A.append([x / sum(e) for x in e])
    r = {j: sum(A[i][j] for i in range(P) if variant != "others only" or i != j) / P for j in range(P)}
    return {j: H[j] for j in range(P)}, r


@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_matches_the_literal_formula(seed):
    batch, rec = run_engine(get_policy("visionzip"), seed, (-1,), (0.25,))  # k = 16: CLS + 13 + 2 contextual
    eager = build(seed, "eager").double()
    for b in range(len(LENGTHS)):
        assert_plan(rec.plans[0], b, visionzip_reference(eager, sample(batch, b)[1], 16))


@pytest.mark.parametrize("seed", [0, 1])
def test_vscan_matches_the_literal_formula(seed):
    batch, rec = run_engine(get_policy("vscan"), seed, (-1, 1), (0.5, 0.25))  # 16 local + 16 global, then 16
    eager = build(seed, "eager").double()
    for b in range(len(LENGTHS)):
        ids, pixels = sample(batch, b)
        tower = vscan_reference(eager, pixels, 32)
        assert_plan(rec.plans[0], b, tower)
        scores = llm_scores(eager, ids, tower, 2)  # the next layer's attention of the last instruction token
        got = rec.scores_seen[0][b].double()
        torch.testing.assert_close(
            got[sorted(scores)],
            torch.tensor([scores[j] for j in sorted(scores)], dtype=torch.float64),
            rtol=1e-4,
            atol=1e-7,
        )
        assert set(rec.plans[1][0][b].tolist()) == set(sorted(scores, key=scores.get, reverse=True)[:16])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "alpha, cell, ratios",
    [
        (0.5, 17.387, (0.25, 0.125)),  # 4 cells of the 8 x 8 grid, k = 16 then 8
        (-0.5, 9.0, (0.75, 0.5)),  # 9 cells of 3 x 3, k = 48: cells left with no pruned member; alpha < 0
    ],
)
def test_vflowopt_matches_the_literal_formula(seed, alpha, cell, ratios):
    t = 11.4  # G: the tokens above ~1.02x the mean (11.4 x 65 / 729)
    batch, rec = run_engine(VFlowOptPolicy(t=t, alpha=alpha, cell=cell), seed, (-1, 1), ratios)
    eager = build(seed, "eager").double()
    k, k2 = (int(r * P) for r in ratios)
    for b in range(len(LENGTHS)):
        tower, s = vflowopt_reference(eager, sample(batch, b)[1], k, t, alpha, cell)
        assert_plan(rec.plans[0], b, tower)
        values = dict(zip(rec.plans[0][0][b].tolist(), rec.plans[0][2][b].double().tolist()))
        assert values == pytest.approx(s, rel=1e-4, abs=1e-7)
        assert set(rec.plans[1][0][b].tolist()) == set(sorted(s, key=s.get, reverse=True)[:k2])  # carried s


@pytest.mark.parametrize("seed", [0, 1])
def test_star_matches_the_literal_formula(seed):
    """STAR's visual self-attention at the tower, then its cross-modal attention after layer 1 on the sequence the
    tower stage left (32 of 64 vision tokens), both against the formula."""
    batch, rec = run_engine(StarPolicy(), seed, (-1, 1), (0.5, 0.25))
    eager = build(seed, "eager").double()
    for b in range(len(LENGTHS)):
        ids, pixels = sample(batch, b)
        H, r = star_reference(eager, pixels)
        got = rec.scores_seen[0][b].double()
        torch.testing.assert_close(got, torch.tensor([r[j] for j in range(P)], dtype=torch.float64), rtol=1e-4, atol=0)
        kept = sorted(r, key=r.get, reverse=True)[:32]
        assert set(rec.plans[0][0][b].tolist()) == set(kept)
        scores = llm_scores(eager, ids, {j: H[j] for j in kept}, 1, queries="question")
        got = rec.scores_seen[1][b].double()
        torch.testing.assert_close(
            got[sorted(scores)],
            torch.tensor([scores[j] for j in sorted(scores)], dtype=torch.float64),
            rtol=1e-4,
            atol=0,
        )
        assert set(rec.plans[1][0][b].tolist()) == set(sorted(scores, key=scores.get, reverse=True)[:16])


def test_star_with_a_wrong_formula_fails_the_comparison():
    """The receivers' sum without the token's own attention (the reading of the earlier decoder-layer stage) breaks
    the comparison that the paper's formula passes."""
    _, rec = run_engine(StarPolicy(), 0, (-1,), (0.5,))
    eager, pixels = build(0, "eager").double(), make_batch(LENGTHS, seed=0)["pixel_values"][:1]
    expected = {v: star_reference(eager, pixels, v)[1] for v in ("", "others only")}
    got = rec.scores_seen[0][0].double()
    torch.testing.assert_close(
        got, torch.tensor([expected[""][j] for j in range(P)], dtype=torch.float64), rtol=1e-4, atol=0
    )
    with pytest.raises(AssertionError, match="not close"):
        wrong = torch.tensor([expected["others only"][j] for j in range(P)], dtype=torch.float64)
        torch.testing.assert_close(got, wrong, rtol=1e-4, atol=0)


@pytest.mark.parametrize("grid", [27, 24])
def test_vflowopt_cells_scale_from_siglip_grid(grid):
    """The published m = 17.387 is in patches of SigLIP's 27 x 27 grid: there it applies as published, on CLIP's
    24 x 24 grid as m 24 / 27 = 15.46 (patch rows 0-15 in the first cell, not 0-17)."""
    size = 17.387 * grid / 27
    cell, num_cells = VFlowOptPolicy().cells(grid * grid)
    expected = [math.floor(p // grid / size) * 2 + math.floor(p % grid / size) for p in range(grid * grid)]
    assert num_cells == 4 and cell.tolist() == expected


@pytest.mark.parametrize(
    "name, variant",
    [("visionzip", "mean including the target"), ("vscan", "kept token excluded"), ("vflowopt", "unweighted cells")],
)
def test_a_wrong_formula_fails_the_comparison(name, variant):
    """A merging detail changed in the reference breaks a comparison that the right formula passes."""
    eager, pixels = build(0, "eager").double(), make_batch(LENGTHS, seed=0)["pixel_values"][:1]
    if name == "vflowopt":
        _, rec = run_engine(VFlowOptPolicy(t=11.4, alpha=0.5), 0, (-1,), (0.25,))
        reference = lambda v: vflowopt_reference(eager, pixels, 16, 11.4, 0.5, 17.387, v)[0]  # noqa: E731
    elif name == "visionzip":
        _, rec = run_engine(get_policy(name), 0, (-1,), (0.25,))
        reference = lambda v: visionzip_reference(eager, pixels, 16, v)  # noqa: E731
    else:
        _, rec = run_engine(get_policy(name), 0, (-1,), (0.5,))
        reference = lambda v: vscan_reference(eager, pixels, 32, v)  # noqa: E731
    assert_plan(rec.plans[0], 0, reference(""))
    with pytest.raises(AssertionError, match="not close"):
        assert_plan(rec.plans[0], 0, reference(variant))
