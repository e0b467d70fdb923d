"""Pyramid Token Pruning: region and token saliency from the vision tower, instruction relevance from an LLM layer."""

from __future__ import annotations

import math

import torch
from transformers import LlavaConfig, PreTrainedConfig

from lvpruning.adapters import attention_rows_flops, vision_attention_rows_flops
from lvpruning.layout import BASE, TILE, VisionLayout
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import MergePlan, StageInput, StageShape

ALPHA = 0.5  # weight of the instruction relevance against the token saliency (our reading)


def region_of(layout: VisionLayout) -> torch.Tensor:
    """Each vision token's region, same shape as ``layout``: 0 the base view, 1 + t tile t (its tower pass), -1 none
    (newline, empty, a kept CLS token)."""
    base = (layout.kind == BASE) & (layout.row >= 0)
    return torch.where(base, 0, torch.where(layout.kind == TILE, 1 + layout.tile, -1))


def base_cells(layout: VisionLayout, side: int) -> torch.Tensor:
    """(B, Nv) for each tile token the base view's tower token that shows the same part of the image, -1 elsewhere.

    The base view is the whole image resized to ``side x side`` patches (HF's processor squashes it to a square);
    the tiles' unpadded grid (the rows and columns HF's unpadding keeps) is the whole image too, so tile cell (y, x)
    of an ``H x W`` unpadded grid shows base cell ``(floor(y * side / H), floor(x * side / W))``."""
    out = torch.full_like(layout.kind, -1)
    for b in range(layout.kind.shape[0]):
        tile = layout.kind[b] == TILE
        if not bool(tile.any()):
            continue
        row, col = layout.row[b, tile], layout.col[b, tile]
        y, x = row - row.min(), col - col.min()
        height, width = int(y.max()) + 1, int(x.max()) + 1
        out[b, tile] = 1 + (y * side // height) * side + x * side // width
    return out


def group_sums(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per token the sum of ``values`` (B, V) over its ``group`` (B, V) (-1: its own group of none, sum 0)."""
    sums = values.new_zeros(values.shape[0], num_groups + 1).scatter_add(1, group + 1, values)
    return sums.gather(1, group + 1) * (group >= 0)


def region_budgets(k: int, sizes: list[int], weights: list[float]) -> list[int]:
    """``k`` split over regions of ``sizes`` tokens in proportion to ``weights``: a region whose exact share
    reaches its size gets all its tokens and the rest is shared again among the others (equally where they all
    weigh 0); otherwise each gets the floor of its share, and one more goes to the largest fractional parts (ties:
    the first region). Sums to ``min(k, sum(sizes))``."""
    budgets, left = [0] * len(sizes), min(k, sum(sizes))
    while left > 0:
        open_ = [p for p in range(len(sizes)) if budgets[p] < sizes[p]]
        w = [max(weights[p], 0.0) for p in open_]
        if sum(w) <= 0:
            w = [1.0] * len(open_)
        exact = [left * x / sum(w) for x in w]
        capped = [p for p, e in zip(open_, exact) if math.floor(e) >= sizes[p] - budgets[p]]
        for p in capped:
            left -= sizes[p] - budgets[p]
            budgets[p] = sizes[p]
        if capped:
            continue
        for p, e in zip(open_, exact):
            budgets[p] += math.floor(e)
            left -= math.floor(e)
        for i in sorted(range(len(open_)), key=lambda i: (math.floor(exact[i]) - exact[i], i))[:left]:
            budgets[open_[i]] += 1
        left = 0
    return budgets


class PTPPolicy(PruningPolicy):
    """Pyramid Token Pruning (Liang et al., 2025, "Pyramid Token Pruning for High-Resolution Large Vision-Language
    Models via Region, Token, and Instruction-Guided Importance", arXiv 2509.15704; no public code). Bottom-up
    saliency at two levels of the image pyramid, region (the base view and each tile) and token, and top-down
    relevance to the instruction: salient regions get more of the budget, and within a region the tokens that are
    salient and that the instruction points at are kept. Our reading (docs/methods.md lists each choice), with
    a^p_j = mean_h A^(L_f)_h[CLS, j] the head-mean CLS attention of the feature layer L_f (22 of 24) in tower pass
    p (the base view p = 0, tile t p = 1 + t):

        region saliency  R_t = sum_{j in tile t} a^0_{c(j)}     c(j): the base-view cell showing token j's spot
        region weights   w_0 = n_0 / n,  w_t = (1 - n_0 / n) R_t / sum_t' R_t'     (n_p: region p's tokens)
        token saliency   s_j = a^p_j / sum_{i in p} a^p_i
        instruction      r_j = mean_{q in Q} mean_h A^(K)_h[q, j]    Q: the instruction tokens after the image
        keep score       score_j = (1 - alpha) s_j + alpha r_j / sum_{i in p} r_i
        budgets          k_p proportional to w_p (:func:`region_budgets`), the top k_p by score in each region

    The engine's stages: the vision-tower stage (layer -1, keep ratio 1) keeps every token and records
    ``v_j = w_p s_j`` (the region sums give w_p back, the ratios s_j); the pruning stage after decoder layer K
    reads layer K's attention (``StageInput.attention``) and keeps k_b. The newline tokens belong to no region:
    kept only where k_b exceeds the sample's patches. On LLaVA-1.5 the image is one region (w_0 = 1).
    Published: none we could read (the paper's method section was not at hand); ``published`` is layer K = 1
    (the relevance of the second layer, as FastV's K = 2) and 320 of LLaVA-NeXT-7B's 2,880 tokens (1/9).
    """

    name = "ptp"
    published = Schedule(layers=(-1, 1), ratios=(1.0, 1 / 9))
    tower_stage = True
    tower_tiles = True
    tower_cls = True
    per_sample_budgets = True

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha

    def check_layers(self, layers: tuple[int, ...]) -> None:
        if len(layers) != 2 or layers[0] != -1:
            raise ValueError(
                f"ptp reads the vision tower, then prunes once after an LLM layer: layers [-1, K], not {list(layers)}"
            )

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        if stage.layer == -1:
            if k < stage.num_vision:
                raise ValueError("ptp keeps every vision token at the vision tower (keep ratio 1 at layer -1)")
            B, Nv = stage.vision_pos.shape
            return MergePlan(
                torch.arange(Nv, device=stage.vision_pos.device).expand(B, Nv), values=self.saliency(stage)
            )
        scores = self.scores(stage)  # (B, V)
        if scores.is_meta:  # FLOPs counting: the kept set does not change the count
            return MergePlan(scores.topk(k, dim=1).indices)
        region = region_of(stage.kept_layout()).cpu()  # (B, V)
        valid, weight, scores = stage.vision_valid().cpu(), stage.recorded(-1).float().cpu(), scores.float().cpu()
        rows = []
        for b, k_b in enumerate(stage.keep_counts):
            regions = sorted(set(region[b, valid[b] & (region[b] >= 0)].tolist()))
            members = [((region[b] == p) & valid[b]).nonzero()[:, 0] for p in regions]
            budgets = region_budgets(k_b, [m.shape[0] for m in members], [float(weight[b, m].sum()) for m in members])
            kept = [m[scores[b, m].topk(k_p).indices] for m, k_p in zip(members, budgets)]
            none = (valid[b] & (region[b] < 0)).nonzero()[:, 0]  # the newlines, in order
            kept = torch.cat([*kept, none[: k_b - sum(budgets)]])
            is_kept = torch.zeros(region.shape[1], dtype=torch.bool).scatter(0, kept, True)
            rest = torch.argsort(is_kept.to(torch.int8), stable=True)[: k - kept.shape[0]]  # distinct, not kept
            rows.append(torch.cat([kept, rest]))
        return MergePlan(torch.stack(rows).to(stage.vision_pos.device))

    def saliency(self, stage: StageInput) -> torch.Tensor:
        """The vision-tower stage's record v_j = w_p s_j (B, Nv), 0 on tokens of no region."""
        states = stage.vision_states[0]
        tiled = states.dim() == 4
        B, M, device = states.shape[0], states.shape[-2], states.device
        P = states.shape[1] if tiled else 1
        if tiled:
            cls = torch.zeros(B, P, 1, dtype=torch.long, device=device)
            a = stage.vision_attention(stage.feature_layer, cls).mean(dim=2)[:, :, 0]  # (B, P, M)
        else:
            cls = torch.zeros(B, 1, dtype=torch.long, device=device)
            a = stage.vision_attention(stage.feature_layer, cls).mean(dim=1)[:, :1]  # (B, 1, M)
        a = a.float()
        region, token = region_of(stage.layout), stage.tower_token  # (B, Nv) each
        has = region >= 0
        a_j = a.flatten(1).gather(1, (region.clamp_min(0) * M + token.clamp_min(0))) * has  # (B, Nv)
        s = a_j / group_sums(a_j, region, P).clamp_min(torch.finfo(a.dtype).tiny)
        cell = base_cells(stage.layout_host, math.isqrt(M - 1)).to(device)  # (B, Nv)
        shown = a[:, 0].gather(1, cell.clamp_min(0)) * (cell >= 0)  # a^0 of the cell each tile token shows
        R = shown.new_zeros(B, P + 1).scatter_add(1, region + 1, shown)[:, 1:]  # (B, P), R_0 = 0
        n = has.new_zeros(B, P + 1, dtype=a.dtype).scatter_add(1, region + 1, has.to(a.dtype))[:, 1:]  # (B, P)
        base_share = n[:, :1] / n.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        w = (1 - base_share) * R / R.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        w = torch.cat([base_share, w[:, 1:]], dim=1)  # (B, P)
        return w.gather(1, region.clamp_min(0)) * s

    def scores(self, stage: StageInput) -> torch.Tensor:
        region = region_of(stage.kept_layout())  # (B, V)
        v = stage.recorded(-1).float() * stage.vision_valid()
        tiny = torch.finfo(v.dtype).tiny
        s = v / group_sums(v, region, stage.num_vision).clamp_min(tiny)
        queries = stage.after_image()  # (B, T) the instruction after the image
        rows = stage.attention(stage.text_pos).mean(dim=1).float()  # (B, T, N), mean over heads
        to_vision = rows.gather(2, stage.vision_pos[:, None, :].expand(-1, rows.shape[1], -1))  # (B, T, V)
        r = (to_vision * queries[..., None]).sum(1) / queries.sum(1, keepdim=True).clamp_min(1)  # (B, V)
        r = r * stage.vision_valid() * (region >= 0)
        return (1 - self.alpha) * s + self.alpha * r / group_sums(r, region, stage.num_vision).clamp_min(tiny)

    def overhead_flops(self, text_config: PreTrainedConfig, stage: StageShape) -> int:
        return attention_rows_flops(text_config, stage.num_text, stage.num_tokens) if stage.layer >= 0 else 0

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        v = config.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1  # M, CLS included
        return max(1, len(stage.tower_passes)) * vision_attention_rows_flops(v, 1, tokens)
