"""STAR: stage-wise attention-guided token reduction."""

from __future__ import annotations

import math

import torch

from lvpruning.adapters import attention_rows_flops
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import StageInput, StageShape, gather_tokens


def visual_self_attention(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """STAR's early score: with ``A = softmax(H_v H_v^T / sqrt(d))`` (parameter-free and bidirectional, each row
    over the ``valid`` (B, V) tokens), the attention each token receives, ``r_j = (1 / |V|) sum_i A[i, j]`` over
    the valid queries, in fp32: (B, V, d) -> (B, V)."""
    h = h.float()
    logits = h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, V, V) queries x keys
    A = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).nan_to_num()
    A = A * valid[:, :, None]  # only the tokens in play attend (not a sample's empty slots)
    return A.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)


class StarPolicy(PruningPolicy):
    """STAR (Guo et al., 2025, "Stage-Wise Attention-Guided Token Reduction", arXiv 2505.12359; no public code, so
    this follows the paper's description).

    Early stage, at the vision tower (layer -1, right after the encoder and projector): the visual self-attention
    ``A = softmax(H_v H_v^T / sqrt(d))`` of the projected vision tokens H_v (LLaVA's ``H_v = W Z_v``, the tokens fed
    to the LLM; d their width), parameter-free and bidirectional, and the score of token j is the attention it
    receives, ``r_j = (1 / |V|) sum_i A[i, j]``. Later stages, after a decoder layer: the cross-modal attention from
    the instruction tokens after the image, ``s_j = (1 / H|I|) sum_h sum_{t in I} A_h[t, j]``.

    Our reading, where the paper leaves room: the paper writes ``r_i = (1 / L_v) sum_j A_ij``, which is 1 / L_v for
    every token under a row softmax; as ``H_v H_v^T`` is symmetric, the attention received (a column mean) is the
    same as that row mean under a column softmax, and the only reading that ranks. The instruction is the text after
    the image; the schedule (the tower keeping 0.5, then after layer 15 keeping 0.25) is ours, as the paper text
    gives no layers or ratios. The early stage reads nothing of the tower, so it runs on every family.
    """

    name = "star"
    published = Schedule(layers=(-1, 15), ratios=(0.5, 0.25))
    tower_stage = True
    tower_tiles = True  # reads the projected tokens only: every family
    tower_free = True

    def scores(self, stage: StageInput) -> torch.Tensor:
        if stage.layer == -1:
            return visual_self_attention(gather_tokens(stage.hidden_in, stage.vision_pos), stage.vision_valid())
        queries = stage.after_image()  # (B, T)
        rows = stage.attention(stage.text_pos).mean(dim=1)  # (B, T, N)
        to_vision = rows.gather(2, stage.vision_pos[:, None, :].expand(-1, rows.shape[1], -1))  # (B, T, V)
        return (to_vision * queries[..., None]).sum(1) / queries.sum(1, keepdim=True).clamp_min(1)

    def overhead_flops(self, text_config, stage: StageShape) -> int:
        if stage.layer == -1:
            return 2 * stage.num_vision * stage.num_vision * text_config.hidden_size  # H_v H_v^T
        return attention_rows_flops(text_config, stage.num_text, stage.num_tokens)
