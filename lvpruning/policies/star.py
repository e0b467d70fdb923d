"""STAR: stage-wise attention-guided token reduction."""

from __future__ import annotations

import torch

from lvpruning.adapters import attention_rows_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import StageInput, StageShape


class StarPolicy(PruningPolicy):
    """STAR (Guo et al., 2025, "Stage-Wise Attention-Guided Token Reduction", arXiv 2505.12359; no public code, so
    this follows the paper's description).

    Stage 1, early: each vision token's score is the attention it receives from the other vision tokens,
    ``s_j = (1 / H) sum_h sum_{i in V, i != j} A_h[i, j]``. Later stages: the cross-modal attention from the
    instruction tokens after the image, ``s_j = (1 / H|I|) sum_h sum_{t in I} A_h[t, j]``.

    Our reading, where the paper leaves room: both scores come from the stage layer's own attention heads (the
    paper's summaries describe a dot-product softmax over the visual embeddings right after the vision encoder for
    stage 1, which needs the vision-tower stage of part 2); the sum over receivers; the instruction is the text
    after the image; the schedule (after layers 1 and 15, keeping 0.5 then 0.25) is ours, as the seed text gives
    no layers or ratios.
    """

    name = "star"
    published = Schedule(layers=(1, 15), ratios=(0.5, 0.25))

    def scores(self, stage: StageInput) -> torch.Tensor:
        V = stage.vision_pos.shape[1]
        if stage.stage == 0:
            rows = stage.attention(stage.vision_pos).mean(dim=1)  # (B, V, N)
            v2v = rows.gather(2, stage.vision_pos[:, None, :].expand(-1, V, -1))  # (B, V, V)
            v2v = v2v * stage.vision_valid()[:, :, None]  # only tokens in play give (not a sample's empty slots)
            return v2v.sum(dim=1) - v2v.diagonal(dim1=1, dim2=2)  # received from the others
        queries = stage.after_image()  # (B, T)
        rows = stage.attention(stage.text_pos).mean(dim=1)  # (B, T, N)
        to_vision = rows.gather(2, stage.vision_pos[:, None, :].expand(-1, rows.shape[1], -1))  # (B, T, V)
        return (to_vision * queries[..., None]).sum(1) / queries.sum(1, keepdim=True).clamp_min(1)

    def overhead_flops(self, text_config, stage: StageShape) -> int:
        queries = stage.num_vision if stage.stage == 0 else stage.num_text
        return attention_rows_flops(text_config, queries, stage.num_tokens)
