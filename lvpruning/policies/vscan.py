"""VScan: a global and a local scan of the vision tower's CLS attention with merging, then pruning in the LLM."""

from __future__ import annotations

import math

import torch
from transformers import LlavaConfig, PreTrainedConfig

from lvpruning.adapters import attention_rows_flops, vision_attention_rows_flops
from lvpruning.merging import group_sum, group_sum_flops, nearest, nearest_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.policies.tiles import merged_counts, pass_budgets, per_sample_plan, tower_passes
from lvpruning.qwen_vl import QWEN_VL_CONFIGS, mean_received_attention, tower_rows_flops
from lvpruning.stage import MergePlan, StageInput, StageShape, gather_tokens

WINDOWS = 4  # per side: 6 x 6 windows on LLaVA-1.5's 24 x 24 grid
SHALLOW = 6 / 24  # the local scan reads encoder layer 5 (zero-based) of 24


def shallow_layer(num_layers: int) -> int:
    """The local scan's encoder layer: 5 of 24, proportionally on a tower of ``num_layers``."""
    return max(0, round(SHALLOW * num_layers) - 1)


class VScanPolicy(PruningPolicy):
    """VScan (Zhang et al., 2025, "Rethinking Visual Token Reduction for Efficient LVLMs"; Tencent/SelfEvolvingAgent,
    ``VScan/llava/model/llava_arch.py``, ``modeling_llama_x.py``).

    Vision tower, with a_l = mean_h A^(l)_h[CLS, patches] the head-mean CLS attention of encoder layer l:

        local scan:  the top floor(floor(k / 2) / 16) patches by a_5 inside each of the 16 windows (6 x 6 of 24 x 24)
        global scan: the top (k - local) patches by a_22 (the feature layer) among the rest
        merge:       each dropped token joins its most cosine-similar kept token (projected features x);
                     x'_j = (x_j + sum_{i -> j} x_i) / (1 + n_j)

    LLM: after layer 15 the vision tokens are ranked by the attention that the last prompt token pays them in layer
    16 (mean over heads; ``StageInput.next_attention``), nothing merged. Published (LLaVA-1.5-7B, the repository's
    scripts): 96 tokens after the tower, 32 after layer 15 (``layer_list [16]``: pruning before 16), 64 on average.
    Where we differ: when the local share is not a multiple of 16 the global scan fills the budget (the reference
    keeps fewer than k); kept tokens keep their original positions (the reference renumbers).

    LLaVA-NeXT (the same ``llava_arch.py``: ``encode_images`` on every crop, ``scripts/llava1_6``: 96 tokens per
    crop, then 32 in all after layer 15): both scans and the merge run on every tower pass apart (the base view,
    then each tile; windows of each pass's own grid; a dropped token joins a kept token of its own pass). The
    newline tokens are kept as structure, unchanged, as the reference's index mask keeps them (as many as fit
    while every pass keeps one); the rest of the sample's k_b is split over the passes
    (:func:`~lvpruning.policies.tiles.pass_budgets`). Its decoder stage ranks newlines like any vision token, as
    the reference does. Where we differ: the reference keeps 96 per crop whatever the grid and selects before
    HF's unpadding (a token kept in a letterbox row is then lost, with what merged into it); here each sample
    keeps its own k_b of its own count, and only the tokens that reach the decoder are scanned and merged (a
    window keeps at most the tokens it has there).

    Qwen2-VL / Qwen2.5-VL (no CLS token; a vision token is the ``PatchMerger``'s 2 x 2 patches), our reading: both
    scans on each sample's merged tokens, with a_l the mean attention received
    (:func:`~lvpruning.qwen_vl.mean_received_attention`: over the heads and the image's query patches, then over
    the 4 patches of a token) in place of the CLS attention; the local scan's block is 6/24 of the depth (block 7
    of 32: a full-attention block in Qwen2.5-VL; on a window block the rows stay within its windows), the global
    scan's the last block (its output feeds the merger); the 4 x 4 windows split the image's own merged grid
    (rows, columns) proportionally; the merge on the merger's output, as on LLaVA.
    """

    name = "vscan"
    published = Schedule(layers=(-1, 15), ratios=(96 / 576, 32 / 576))
    tower_stage = True
    tower_tiles = True
    tower_cls = True
    tower_merged = True
    per_sample_budgets = True

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        if stage.layer != -1:
            return super().plan(stage, k)
        if stage.merge_unit:
            return self._plan_merged(stage)
        if stage.vision_states[0].dim() == 4:
            return self._plan_tiles(stage)
        B, P = stage.vision_pos.shape
        if k >= P:
            return MergePlan(torch.arange(P, device=stage.vision_pos.device).expand(B, P))
        num_layers, grid = len(stage.vision_states) - 1, math.isqrt(P)
        cls_query = torch.zeros(B, 1, dtype=torch.long, device=stage.vision_pos.device)
        shallow = shallow_layer(num_layers)
        local_rows = stage.vision_attention(shallow, cls_query).mean(dim=1)[:, 0, 1:]  # (B, P)
        global_rows = stage.vision_attention(stage.feature_layer, cls_query).mean(dim=1)[:, 0, 1:]
        patch = torch.arange(P)
        window = (patch // grid * WINDOWS // grid) * WINDOWS + (patch % grid) * WINDOWS // grid  # (P,) raster
        per_window = min(k // 2 // WINDOWS**2, int(torch.bincount(window, minlength=WINDOWS**2).min()))
        window = window.to(local_rows.device)
        local = [
            local_rows.masked_fill(window != w, float("-inf")).topk(per_window, dim=1).indices
            for w in range(WINDOWS**2)
        ]
        local = torch.cat(local, dim=1)  # (B, 16 * per_window)
        rest = global_rows.scatter(1, local, float("-inf"))
        keep = torch.cat([local, rest.topk(k - local.shape[1], dim=1).indices], dim=1)  # (B, k)
        kept = torch.zeros_like(rest, dtype=torch.bool).scatter(1, keep, True)
        dropped = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, : P - k]  # (B, P - k)
        x = gather_tokens(stage.hidden_out, stage.vision_pos)  # (B, P, C) the projector's output
        x_kept, x_dropped = gather_tokens(x, keep), gather_tokens(x, dropped)
        sums, counts = group_sum(x_dropped, nearest(x_dropped, x_kept), k)
        return MergePlan(keep, (x_kept.float() + sums) / (1 + counts[..., None]))

    def _plan_tiles(self, stage: StageInput) -> MergePlan:
        """LLaVA-NeXT: the newline tokens kept, then both scans and the merge on each tower pass apart."""
        device = stage.hidden_out.device
        B, P = stage.vision_states[0].shape[:2]
        side = math.isqrt(stage.vision_states[0].shape[-2] - 1)
        cls_query = torch.zeros(B, P, 1, dtype=torch.long, device=device)
        shallow = shallow_layer(len(stage.vision_states) - 1)
        local_rows = stage.vision_attention(shallow, cls_query).mean(dim=2)[:, :, 0]  # (B, P, M)
        global_rows = stage.vision_attention(stage.feature_layer, cls_query).mean(dim=2)[:, :, 0]
        passes, newlines = tower_passes(stage)
        keep, hidden = [], []
        for b, (mine, k_b) in enumerate(zip(passes, stage.keep_counts)):
            lines = newlines[b][: min(newlines[b].shape[0], max(0, k_b - len(mine)))].to(device)
            budgets = pass_budgets(k_b - lines.shape[0], [tp.slots.shape[0] for tp in mine])
            slots = [lines]
            states = [stage.hidden_out[b, stage.vision_pos[b, lines]]]
            for tp, k_p in zip(mine, budgets):
                if k_p == 0:
                    continue
                tokens, own = tp.tokens.to(device), tp.slots.to(device)
                x = stage.hidden_out[b, stage.vision_pos[b, own]]  # (n_p, C) the projector's output
                if k_p >= own.shape[0]:
                    slots.append(own)
                    states.append(x)
                    continue
                cell = tp.tokens - 1
                window = (cell // side * WINDOWS // side) * WINDOWS + (cell % side) * WINDOWS // side  # (n_p,)
                kept = self._scan_pass(local_rows[b, tp.index, tokens], global_rows[b, tp.index, tokens], window, k_p)
                is_kept = torch.zeros(own.shape[0], dtype=torch.bool, device=device).scatter(0, kept, True)
                dropped = torch.argsort(is_kept.to(torch.int8), stable=True)[: own.shape[0] - k_p]
                x_kept, x_dropped = x[kept][None], x[dropped][None]  # (1, k_p, C), (1, n_p - k_p, C)
                sums, counts = group_sum(x_dropped, nearest(x_dropped, x_kept), k_p)
                slots.append(own[kept])
                states.append(((x_kept.float() + sums) / (1 + counts[..., None]))[0])
            keep.append(torch.cat(slots))
            hidden.append(torch.cat([h.to(stage.hidden_out.dtype) for h in states]))
        return per_sample_plan(stage, keep, hidden)

    def _plan_merged(self, stage: StageInput) -> MergePlan:
        """Qwen-VL: both scans and the merge on each sample's merged tokens, by the mean attention received."""
        unit, device = stage.merge_unit, stage.hidden_out.device
        counts = merged_counts(stage)
        if all(k >= n for n, k in zip(counts, stage.keep_counts)):  # every sample keeps all its tokens
            return MergePlan(torch.arange(max(counts), device=device).expand(len(counts), -1))
        patches = torch.arange(stage.vision_states[0].shape[1])[None, :] < torch.tensor(counts)[:, None] * unit
        patches = patches.to(device)
        shallow = shallow_layer(len(stage.vision_states) - 1)
        local_rows = mean_received_attention(stage.vision_attention(shallow, None), patches, unit)  # (B, Nv)
        global_rows = mean_received_attention(stage.vision_attention(stage.feature_layer, None), patches, unit)
        keep, hidden = [], []
        for b, (n, k) in enumerate(zip(counts, stage.keep_counts)):
            x = stage.hidden_out[b, stage.vision_pos[b, :n]]  # (n, C) the merger's output
            if k >= n:
                keep.append(torch.arange(n, device=device))
                hidden.append(x)
                continue
            row, col = stage.layout_host.row[b, :n], stage.layout_host.col[b, :n]
            rows, cols = int(row.max()) + 1, int(col.max()) + 1  # the image's merged grid
            window = (row * WINDOWS // rows) * WINDOWS + col * WINDOWS // cols  # (n,)
            kept = self._scan_pass(local_rows[b, :n], global_rows[b, :n], window, k)
            is_kept = torch.zeros(n, dtype=torch.bool, device=device).scatter(0, kept, True)
            dropped = torch.argsort(is_kept.to(torch.int8), stable=True)[: n - k]
            x_kept, x_dropped = x[kept][None], x[dropped][None]  # (1, k, C), (1, n - k, C)
            sums, merged = group_sum(x_dropped, nearest(x_dropped, x_kept), k)
            keep.append(kept)
            hidden.append(((x_kept.float() + sums) / (1 + merged[..., None]))[0].to(x.dtype))
        return per_sample_plan(stage, keep, hidden)

    @staticmethod
    def _scan_pass(local: torch.Tensor, global_: torch.Tensor, window: torch.Tensor, k: int) -> torch.Tensor:
        """One pass's kept tokens (k,) among its n: the top ``floor(k / 2) / 16`` by ``local`` (n,) in each
        ``window`` (n,) (at most the window's tokens), then the top by ``global_`` (n,) among the rest."""
        per_window = k // 2 // WINDOWS**2
        counts = torch.bincount(window, minlength=WINDOWS**2).tolist()
        window = window.to(local.device)
        local_kept = [
            local.masked_fill(window != w, float("-inf")).topk(min(per_window, counts[w])).indices
            for w in range(WINDOWS**2)
        ]
        local_kept = torch.cat(local_kept)
        rest = global_.scatter(0, local_kept, float("-inf"))
        return torch.cat([local_kept, rest.topk(k - local_kept.shape[0]).indices])

    def scores(self, stage: StageInput) -> torch.Tensor:
        rows = stage.next_attention(stage.last_instruction()).mean(dim=1)[:, 0]  # (B, N), mean over heads
        return rows.gather(1, stage.vision_pos)

    def overhead_flops(self, text_config: PreTrainedConfig, stage: StageShape) -> int:
        return attention_rows_flops(text_config, 1, stage.num_tokens) if stage.layer >= 0 else 0

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        patches, k, width = stage.num_vision, stage.kept, config.text_config.hidden_size
        if isinstance(config, QWEN_VL_CONFIGS):  # both blocks' rows over the image's patches, the merge
            if k >= patches:
                return 0
            depth, tower = config.vision_config.depth, config.vision_config.spatial_merge_size**2 * patches
            rows = tower_rows_flops(config, tower) + tower_rows_flops(config, tower, shallow_layer(depth) != depth - 1)
            return rows + nearest_flops(patches - k, k, width) + group_sum_flops(patches - k, k, width)
        if stage.tower_passes:  # LLaVA-NeXT: both rows on every pass, each pass's merge within its share
            lines = min(stage.newlines, max(0, k - len(stage.tower_passes)))
            merges = sum(
                nearest_flops(n - k_p, k_p, width) + group_sum_flops(n - k_p, k_p, width)
                for n, k_p in zip(stage.tower_passes, pass_budgets(k - lines, list(stage.tower_passes)))
                if 0 < k_p < n
            )
            return len(stage.tower_passes) * self._rows_flops(config) + merges
        if k >= patches:
            return 0
        rows = self._rows_flops(config)
        return rows + nearest_flops(patches - k, k, width) + group_sum_flops(patches - k, k, width)

    @staticmethod
    def _rows_flops(config: LlavaConfig) -> int:
        """The CLS rows of the shallow and the feature layer on one tower pass."""
        v = config.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        rows = 2 * vision_attention_rows_flops(v, 1, tokens)
        feature = config.vision_feature_layer % (v.num_hidden_layers + 1) - 1
        if shallow_layer(v.num_hidden_layers) == feature:  # one layer (a small tower): its keys computed once
            rows -= 2 * tokens * v.hidden_size**2
        return rows
