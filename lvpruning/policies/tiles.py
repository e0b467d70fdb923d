"""The vision-tower stage on LLaVA-NeXT's tiles: each sample's tower passes (the base view, then each tile), the
split of its budget k_b over them, and the plan that gives each sample its own k_b.

Shapes: B batch, Nv vision slots, P tower passes, M tower tokens per pass (CLS first), n_p a pass's vision tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lvpruning.layout import EMPTY, NEWLINE, tower_tokens
from lvpruning.stage import MergePlan, StageInput


@dataclass(frozen=True)
class TowerPass:
    """One tower pass of one sample: its vision tokens that reach the decoder (after HF's unpadding), in tower
    order: ``slots`` (n_p,) their indices among the sample's Nv, ``tokens`` (n_p,) their tower tokens (1..M-1)."""

    index: int
    slots: torch.Tensor
    tokens: torch.Tensor


def tower_passes(stage: StageInput) -> tuple[list[list[TowerPass]], list[torch.Tensor]]:
    """Per sample, its tower passes and its newline slots (which have no tower token), from the layout on the CPU
    (so on ``meta`` too). The vision-tower stage is the first, so vision slot j is ``vision_index`` j."""
    side = math.isqrt(stage.vision_states[0].shape[-2] - 1)
    layout = stage.layout_host
    tower_pass, token = tower_tokens(layout, side)  # (B, Nv) each
    passes, newlines = [], []
    for b in range(tower_pass.shape[0]):
        mine = []
        for p in range(int(tower_pass[b].max()) + 1):
            slots = (tower_pass[b] == p).nonzero()[:, 0]
            order = token[b, slots].argsort()
            mine.append(TowerPass(p, slots[order], token[b, slots[order]]))
        passes.append(mine)
        newlines.append((layout.kind[b] == NEWLINE).nonzero()[:, 0])
    return passes, newlines


def pass_budgets(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over passes of ``sizes`` tokens: equal shares (the remainder to the first passes, the base view
    first), none above its pass's size, a capped pass's excess shared among the others. Sums to min(k, sum)."""
    budgets = [0] * len(sizes)
    left = min(k, sum(sizes))
    while left > 0:
        open_ = [p for p in range(len(sizes)) if budgets[p] < sizes[p]]
        share, extra = divmod(left, len(open_))
        for i, p in enumerate(open_):
            add = min(share + (i < extra), sizes[p] - budgets[p])
            budgets[p] += add
            left -= add
    return budgets


def per_sample_plan(stage: StageInput, keep: list[torch.Tensor], hidden: list[torch.Tensor]) -> MergePlan:
    """One plan from each sample's kept vision slots ``keep[b]`` (k_b,) and their hidden states ``hidden[b]``
    (k_b, C): (B, max k), each row completed by slots it does not keep (distinct, so the engine's padding of a
    sample's entries beyond k_b drops nothing kept)."""
    k = max(stage.keep_counts)
    Nv = stage.vision_pos.shape[1]
    rows, states = [], []
    for b, (slots, h) in enumerate(zip(keep, hidden)):
        assert slots.shape[0] == stage.keep_counts[b], (slots.shape, stage.keep_counts[b])
        kept = torch.zeros(Nv, dtype=torch.bool, device=slots.device).scatter(0, slots, True)
        rest = torch.argsort(kept.to(torch.int8), stable=True)[: k - slots.shape[0]]  # (k - k_b,) not kept
        rows.append(torch.cat([slots, rest]))
        filler = stage.hidden_out[b].gather(0, stage.vision_pos[b, rest, None].expand(-1, h.shape[-1]))
        states.append(torch.cat([h.to(stage.hidden_out.dtype), filler]))
    return MergePlan(torch.stack(rows), torch.stack(states))


def merged_counts(stage: StageInput) -> list[int]:
    """Each sample's own vision tokens n_b, from the layout on the CPU (so also on ``meta``)."""
    return (stage.layout_host.kind != EMPTY).sum(dim=1).tolist()
