"""The masked softmax of eq. 9 against a direct, loop-based transcription of eqs. 7-9."""

from __future__ import annotations

import math

import pytest
import torch

from lvpruning.adapters import boolean_causal_mask
from lvpruning.attention import masked_softmax_attention


def reference(query, key, value, padding, keep, scaling):
    """Eq. 7: M_ij = 1 if i == j or j is text, else D_j; eq. 9 on the causal + padding scores, elementwise in
    float64 and differentiable in ``keep``. Every key's exponent is capped at the best kept score of its row: the
    forward value is eq. 9's (a pruned key's weight is 0 either way), the gradient is the one that
    ``masked_softmax_attention`` promises for pruned keys. Returns (B, N, H, d), zero on padded rows."""
    B, H, N, d = query.shape
    groups = H // key.shape[1]
    out = [[[torch.zeros(d, dtype=torch.float64)] * H for _ in range(N)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for i in range(N):
                if not padding[b, i]:
                    continue
                visible = [j for j in range(i + 1) if padding[b, j]]
                m = [torch.ones((), dtype=torch.float64) if j == i else keep[b, j].double() for j in visible]
                a = [float(query[b, h, i] @ key[b, h // groups, j]) * scaling for j in visible]
                shift = max(s for s, mj in zip(a, m, strict=True) if float(mj.detach()) > 0)  # eq. 9 is shift-free
                weights = [math.exp(min(s - shift, 0.0)) * mj for s, mj in zip(a, m, strict=True)]
                total = sum(weights)
                out[b][i][h] = sum(
                    w / total * value[b, h // groups, j].double() for w, j in zip(weights, visible, strict=True)
                )
    return torch.stack([torch.stack([torch.stack(row) for row in sample]) for sample in out])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_masked_softmax_matches_equation_9(seed, kv_heads):
    g = torch.Generator().manual_seed(seed)
    B, H, N, d = 2, 4, 7, 8
    q = torch.randn(B, H, N, d, generator=g)
    k = torch.randn(B, kv_heads, N, d, generator=g)
    v = torch.randn(B, kv_heads, N, d, generator=g)
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    vision = torch.zeros(B, N, dtype=torch.bool)
    vision[:, 2:5] = True
    decisions = (torch.rand(B, N, generator=g) > 0.5).float()
    keep = torch.where(vision, decisions, 1.0)
    module = torch.nn.Module()
    out, _ = masked_softmax_attention(module, q, k, v, boolean_causal_mask(padding), d**-0.5, token_keep=keep)
    expected = reference(q, k, v, padding, keep, d**-0.5)
    torch.testing.assert_close(out[padding].double(), expected[padding], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_decisions_and_is_finite():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], requires_grad=True)
    out, _ = masked_softmax_attention(
        torch.nn.Module(),
        q,
        k,
        v,
        boolean_causal_mask(torch.ones(1, 5, dtype=torch.bool)),
        0.5,
        token_keep=keep,
    )
    out.sum().backward()
    assert torch.isfinite(keep.grad).all() and keep.grad[0, 1] != 0  # a dropped token still gets a gradient


def test_a_pruned_key_with_a_huge_score_neither_overflows_nor_leaks():
    """exp() of a pruned key's score far above every kept one must not give inf * 0 = NaN (found in training)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    k[:, :, 2] = q[:, :, 5] * 500.0  # key 2 (pruned below) matches query 5 with a score of thousands
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    padding = torch.ones(1, 6, dtype=torch.bool)
    out, _ = masked_softmax_attention(torch.nn.Module(), q, k, v, boolean_causal_mask(padding), 0.5, token_keep=keep)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(keep.grad).all()
    expected = reference(q, k, v, padding, keep.detach(), 0.5)
    torch.testing.assert_close(out[0, :5].double(), expected[0, :5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_straight_through_gradient_of_a_pruned_key_is_capped_at_the_best_kept_score(seed):
    """Found in training: with the exact derivative, pruned attention sinks gave decision-module gradients ~1e17.
    Random inputs, one pruned key made to outscore every kept key by far; gradients against the loop reference."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, d = 2, 2, 7, 4
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, 2] = q[:, :, 6] * 50.0  # key 2, pruned below, scores in the hundreds for query 6
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[1, 0] = False
    decisions = (torch.rand(B, N, generator=g) > 0.5).double()
    decisions[:, 2] = 0.0
    keep = torch.where(torch.arange(N) >= 2, decisions, 1.0).requires_grad_(True)  # tokens 0-1 text
    weights = torch.randn(B, N, H, d, generator=g, dtype=torch.float64)  # a random linear loss
    out, _ = masked_softmax_attention(torch.nn.Module(), q, k, v, boolean_causal_mask(padding), 0.5, token_keep=keep)
    (out * weights)[padding].sum().backward()
    reference_keep = keep.detach().clone().requires_grad_(True)
    (reference(q, k, v, padding, reference_keep, 0.5) * weights)[padding].sum().backward()
    torch.testing.assert_close(keep.grad, reference_keep.grad, atol=1e-8, rtol=1e-6)
    assert keep.grad[:, 2].abs().max() < 100  # uncapped, exp(hundreds) would overflow or dwarf every other term
