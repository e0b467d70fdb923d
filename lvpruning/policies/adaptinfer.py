"""AdaptInfer: text-prior-weighted text-to-vision attention."""

from __future__ import annotations

import torch

from lvpruning.adapters import attention_rows_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import StageInput, StageShape

NUM_VISION_7B = 576


class AdaptInferPolicy(PruningPolicy):
    """AdaptInfer (weiczh02/AdaptInfer-base, ``llava/model/language_model/score.py``).

    With ``A_h`` the attention of head h at the stage's layer and ``P = A_h[text, text]`` its block among the text
    tokens after the image (the reference's ``[text_token_start:]``, the system prompt excluded), the symmetrised
    ``S_h = P + P^T - diag(P)`` gives a prior over those tokens, its column sums ``p_h[t] = sum_s S_h[s, t]``; the
    vision score is ``s_j = sum_h sum_t p_h[t] A_h[t, j]`` (summed over heads, not normalised). The reference
    recomputes the full eager attention; here only the text rows, from the layer's input. Published
    (LLaVA-1.5-7B): after layers 1, 10, 20 keep 133, 27, 3 of 576 tokens (about 64 on average over the 32 layers)
    or 290, 72, 18 (about 128). As for every method here, the kept tokens keep their original positions (the
    reference renumbers them).
    """

    name = "adaptinfer"
    published = Schedule(layers=(1, 10, 20), ratios=tuple(k / NUM_VISION_7B for k in (133, 27, 3)))

    def scores(self, stage: StageInput) -> torch.Tensor:
        valid = stage.after_image().float()  # (B, T)
        rows = stage.attention(stage.text_pos)  # (B, h, T, N)
        H, T = rows.shape[1], rows.shape[2]
        t2t = rows.gather(3, stage.text_pos[:, None, None, :].expand(-1, H, T, -1))  # (B, h, T, T)
        symmetric = t2t + t2t.transpose(2, 3) - torch.diag_embed(t2t.diagonal(dim1=2, dim2=3))
        symmetric = symmetric * valid[:, None, :, None] * valid[:, None, None, :]
        prior = symmetric.sum(dim=2)  # (B, h, T) column sums
        t2v = rows.gather(3, stage.vision_pos[:, None, None, :].expand(-1, H, T, -1))  # (B, h, T, V)
        return (prior[:, :, None, :] @ t2v)[:, :, 0].sum(dim=1)  # (B, V)

    def overhead_flops(self, text_config, stage: StageShape) -> int:
        heads = text_config.num_attention_heads
        return attention_rows_flops(text_config, stage.num_text, stage.num_tokens) + 2 * heads * stage.num_text * (
            stage.num_vision
        )
