"""VFlowOpt: importance from the vision tower's information flow and patch entropy, recycling, progressive pruning."""

from __future__ import annotations

import math

import torch
from transformers import LlavaConfig
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from lvpruning.adapters import vision_attention_rows_flops
from lvpruning.merging import group_sum, group_sum_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import MergePlan, StageInput, StageShape, gather_tokens

REFERENCE_TOWER = 729  # the published t and m were tuned on SigLIP's 729 tokens (no CLS): t is a multiple of the
REFERENCE_GRID = 27  # mean received attention, 1 / 729, there; the cell size m is in patches of its 27 x 27 grid


def patch_entropy(pixel_values: torch.Tensor, grid: int) -> torch.Tensor:
    """Base-2 entropy (B, P) of the 256-bin grey-level histogram of each of the ``grid x grid`` patches (raster
    order) of the preprocessed image (B, 3, H, W), un-normalised with CLIP's mean and std to [0, 255] and greyed as
    the mean of the channels (VFlowOpt's weights)."""
    mean = pixel_values.new_tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = pixel_values.new_tensor(OPENAI_CLIP_STD, dtype=torch.float32)[:, None, None]
    grey = ((pixel_values.float() * std + mean) * 255).mean(dim=1).round().clamp(0, 255).long()  # (B, H, W)
    B, H, W = grey.shape
    p = H // grid
    patches = grey.view(B, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(B, grid * grid, p * p)
    counts = torch.zeros(B, grid * grid, 256, device=grey.device).scatter_add(
        2, patches, torch.ones_like(patches, dtype=torch.float32)
    )
    prob = counts / (p * p)
    return -(prob * torch.log2(prob + 1e-10)).sum(dim=-1)


class VFlowOptPolicy(PruningPolicy):
    """VFlowOpt (Yang et al., ICCV 2025, "Visual Information Flow-Guided Token Pruning"; sihany077/VFlowOpt,
    ``siglip_encoder.py`` ``perform_self_selection``, ``llava_qwen_training_free.py``, ``modeling_qwen2.py``).

    Importance at the vision tower, from Abar = mean_h A_h, the attention of the encoder layer whose output LLaVA
    projects (22 of 24), over all M tower tokens (CLS included, as the LLaVA-1.5 port does):

        r_j = mean_i Abar[i, j]                       attention received
        G = {j : r_j > t * mean_j r_j}                the global tokens (empty: r is the relevance, as the port)
        c_j = mean_{g in G} Abar[g, j]                context relevance, at the patches
        s_j = c_j + alpha * softmax_j(H_j)            H: entropy of patch j's 256-bin grey histogram

    Recycling: the pruned patches are grouped in cells of m x m patches; each non-empty cell becomes one token, the
    s-weighted mean of its members (x = the projector's output; a negative s, possible with alpha < 0, weighs 0), in
    the slot and with the score of its best member; the directly kept tokens and the recycled ones make k. The LLM
    stages drop the tokens of lowest s (carried from the tower, the recycled ones with their representative's),
    nothing merged.

    The published settings are for LLaVA-OneVision-7B (no LLaVA-1.5 setting exists): its 10% row, t = 39.265,
    alpha = 0, m = 17.387, retention r_v = 0.11662 at the tower, r_1 = 1.0 before layer 9 and r_2 = 0.6011 before
    layer 18, here after layers 8 and 17 of the 7B decoder (67, 67, 40 of 576). They were tuned on SigLIP (729
    tokens, a 27 x 27 grid), so on a tower of M tokens and a G x G grid t becomes t M / 729 (the mean of r is
    exactly 1 / M, as A's rows sum to 1, so this keeps the published threshold t / 729 on the attention itself) and
    m becomes m G / 27 (the same fraction of the image's side): on LLaVA-1.5's CLIP, t = 31.08 and m = 15.46.
    Where we differ: grey levels un-normalised (the reference casts the normalised
    pixels to uint8, which wraps), the fixed k (the reference's cell estimate int(N / m^2) drifts), positions kept
    (eq. 14; the reference renumbers at the tower).
    """

    name = "vflowopt"
    published = Schedule(layers=(-1, 8, 17), ratios=(0.11662, 0.11662, 0.11662 * 0.6011))
    tower_stage = True

    def __init__(self, t: float = 39.265, alpha: float = 0.0, cell: float = 17.387):
        if t < 0 or cell <= 0:
            raise ValueError(f"vflowopt: t must be non-negative and the cell size positive, got t={t}, cell={cell}")
        self.t, self.alpha, self.cell = t, alpha, cell

    def importance(self, stage: StageInput) -> torch.Tensor:
        """s (B, P) for the image's patches."""
        attention = stage.vision_attention(stage.feature_layer, None).mean(dim=1)  # (B, M, M) queries x keys
        received = attention.mean(dim=1)  # (B, M)
        M = received.shape[1]
        threshold = self.t * M / REFERENCE_TOWER * received.mean(dim=1, keepdim=True)
        is_global = (received > threshold).to(attention.dtype)  # (B, M)
        size = is_global.sum(dim=1, keepdim=True)
        relevance = (is_global[:, None, :] @ attention)[:, 0] / size.clamp_min(1)  # (B, M)
        relevance = torch.where(size > 0, relevance, received)[:, 1:]  # the patches
        if self.alpha == 0:
            return relevance
        grid = math.isqrt(relevance.shape[1])
        return relevance + self.alpha * patch_entropy(stage.pixel_values, grid).softmax(dim=1)

    def cells(self, num_patches: int) -> tuple[torch.Tensor, int]:
        """Cell id (P,) of each patch in raster order, and the number of cells."""
        grid = math.isqrt(num_patches)
        size = self.cell * grid / REFERENCE_GRID
        per_side = math.floor((grid - 1) / size) + 1
        patch = torch.arange(num_patches)
        row, col = (patch // grid / size).floor().long(), (patch % grid / size).floor().long()
        return row * per_side + col, per_side * per_side

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        if stage.layer != -1:
            return super().plan(stage, k)
        B, P = stage.vision_pos.shape
        s = self.importance(stage)  # (B, P)
        if k >= P:
            return MergePlan(torch.arange(P, device=s.device).expand(B, P), values=s)
        cell, num_cells = self.cells(P)
        cell = cell.to(s.device)
        rank = torch.argsort(torch.argsort(s, dim=1, descending=True, stable=True), dim=1)  # (B, P), 0 = best
        direct = torch.full((B, 1), max(0, k - num_cells), device=s.device)
        if not s.is_meta:  # the fewest cells the pruned tokens fill: grow the direct share to a fixed point
            for _ in range(num_cells + 1):
                pruned = rank >= direct
                filled = torch.zeros(B, num_cells, device=s.device).scatter_add(1, cell.expand(B, P), pruned.float())
                grown = (k - (filled > 0).sum(dim=1, keepdim=True)).clamp_min(0).maximum(direct)
                if torch.equal(grown, direct):
                    break
                direct = grown
        is_direct = rank < direct  # (B, P)
        groups = torch.where(is_direct, -1, cell.expand(B, P))
        x = gather_tokens(stage.hidden_out, stage.vision_pos)  # (B, P, C) the projector's output
        # s-weighted means; a negative score (alpha < 0) weighs 0, and a cell of no positive weight is a plain mean
        sums, weights = group_sum(x, groups, num_cells, weights=s.clamp_min(0))  # (B, cells, C), (B, cells)
        plain, counts = group_sum(x, groups, num_cells)
        means = torch.where(
            weights[..., None] > 0, sums / weights.clamp_min(1e-12)[..., None], plain / counts.clamp_min(1)[..., None]
        )
        member_s = s.masked_fill(is_direct, float("-inf"))
        best = torch.stack([member_s.masked_fill(cell != c, float("-inf")).argmax(dim=1) for c in range(num_cells)], 1)
        filled = (groups[..., None] == torch.arange(num_cells, device=s.device)).any(dim=1)  # (B, cells)
        slots = torch.where(filled, best, P)  # an empty cell writes to a spare column
        is_best = torch.zeros(B, P + 1, dtype=torch.bool, device=s.device).scatter(1, slots, True)[:, :P]
        priority = torch.where(is_direct, float("inf"), torch.where(is_best, s, float("-inf")))
        keep = priority.topk(k, dim=1).indices  # the direct tokens, then the best-scored recycled ones
        recycled = gather_tokens(means, cell.expand(B, P))  # (B, P, C)
        merged = torch.where(is_direct[..., None], x.float(), recycled)
        return MergePlan(keep, gather_tokens(merged, keep), values=s.gather(1, keep))

    def check_layers(self, layers: tuple[int, ...]) -> None:
        if not layers or layers[0] != -1:
            raise ValueError(
                f"vflowopt's LLM stages rank by the tower's importance: its layers start at -1, not {list(layers)}"
            )

    def scores(self, stage: StageInput) -> torch.Tensor:
        return stage.recorded(-1)

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        tower = stage.num_vision + 1
        flops = vision_attention_rows_flops(config.vision_config, tower, tower) + 2 * tower * tower
        if stage.kept < stage.num_vision:
            cells, width = self.cells(stage.num_vision)[1], config.text_config.hidden_size
            flops += 2 * group_sum_flops(stage.num_vision, cells, width)  # the weighted and the plain means
        return flops
