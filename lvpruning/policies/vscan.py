"""VScan: a global and a local scan of the vision tower's CLS attention with merging, then pruning in the LLM."""

from __future__ import annotations

import math

import torch
from transformers import LlavaConfig, PreTrainedConfig

from lvpruning.adapters import attention_rows_flops, vision_attention_rows_flops
from lvpruning.merging import group_sum, group_sum_flops, nearest, nearest_flops
from lvpruning.policies.base import PruningPolicy, Schedule
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
    """

    name = "vscan"
    published = Schedule(layers=(-1, 15), ratios=(96 / 576, 32 / 576))
    tower_stage = True

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        if stage.layer != -1:
            return super().plan(stage, k)
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

    def scores(self, stage: StageInput) -> torch.Tensor:
        rows = stage.next_attention(stage.last_instruction()).mean(dim=1)[:, 0]  # (B, N), mean over heads
        return rows.gather(1, stage.vision_pos)

    def overhead_flops(self, text_config: PreTrainedConfig, stage: StageShape) -> int:
        return attention_rows_flops(text_config, 1, stage.num_tokens) if stage.layer >= 0 else 0

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        patches, k, width = stage.num_vision, stage.kept, config.text_config.hidden_size
        if k >= patches:
            return 0
        v = config.vision_config
        rows = 2 * vision_attention_rows_flops(v, 1, patches + 1)
        feature = config.vision_feature_layer % (v.num_hidden_layers + 1) - 1
        if shallow_layer(v.num_hidden_layers) == feature:  # one layer (a small tower): its keys computed once
            rows -= 2 * (patches + 1) * v.hidden_size**2
        return rows + nearest_flops(patches - k, k, width) + group_sum_flops(patches - k, k, width)
