"""The cross-attention decision module (paper section 3.1, eqs. 1-4).

Vision tokens are the queries, instruction text tokens the keys and values. Shapes: B batch, V vision tokens
scored, T text tokens, C the LLM's hidden size, D the module's width (C in the paper; ``decision_dim`` when slim),
h heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvpruning.stage import gather_tokens


class CrossAttentionBlock(nn.Module):
    """``O = softmax(Q K^T / sqrt(D / h)) V + Q`` (eq. 3), then the FFN [LN, Linear(D, F), SiLU, Linear(F, D), LN]."""

    def __init__(self, width: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)  # W_q, eq. 1
        self.k_proj = nn.Linear(width, width)  # W_k, eq. 2
        self.v_proj = nn.Linear(width, width)  # W_v, eq. 2
        self.ffn = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ffn_dim),
            nn.SiLU(),
            nn.Linear(ffn_dim, width),
            nn.LayerNorm(width),
        )

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, V, D = vision.shape
        T = text.shape[1]
        q = self.q_proj(vision)  # (B, V, D)
        qh = q.view(B, V, self.num_heads, -1).transpose(1, 2)  # (B, h, V, D/h)
        kh = self.k_proj(text).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, h, T, D/h)
        vh = self.v_proj(text).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, h, T, D/h)
        attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=text_mask[:, None, None, :])  # (B, h, V, D/h)
        out = attn.transpose(1, 2).reshape(B, V, D) + q  # eq. 3
        return out + self.ffn(out)


class DecisionModule(nn.Module):
    """Scores each vision token for keeping (``gamma[..., 0]``) or removing (``gamma[..., 1]``), eq. 4.

    Decoder hidden states grow large in middle layers, so both inputs pass a LayerNorm first (as DynamicViT's
    predictor does); this is the one addition to the paper's description.

    ``decision_dim`` D < C makes the module slim (not in the paper): after the LayerNorms, ``vision_proj`` and
    ``text_proj`` (Linear(C, D) each) project both inputs down, and the blocks and the head ``W_O`` work at D, with
    an FFN of ``ffn_dim`` (default 2D). ``None`` keeps the paper's full-width module (D = C, no projections).
    """

    def __init__(
        self,
        hidden_size: int,
        num_blocks: int = 2,
        num_heads: int = 8,
        ffn_dim: int | None = None,
        decision_dim: int | None = None,
    ):
        super().__init__()
        width = decision_dim or hidden_size
        self.vision_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.vision_proj = nn.Linear(hidden_size, width) if decision_dim else nn.Identity()  # (B, V, C) -> (B, V, D)
        self.text_proj = nn.Linear(hidden_size, width) if decision_dim else nn.Identity()  # (B, T, C) -> (B, T, D)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(width, num_heads, ffn_dim or 2 * width) for _ in range(num_blocks)
        )
        self.score = nn.Linear(width, 2)  # W_O, eq. 4

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """vision (B, V, C), text (B, T, C), text_mask (B, T) bool of real instruction tokens -> gamma (B, V, 2)."""
        x = self.vision_proj(self.vision_norm(vision))  # (B, V, D)
        t = self.text_proj(self.text_norm(text))  # (B, T, D)
        for block in self.blocks:
            x = block(x, t, text_mask)
        return self.score(x)


def decide(
    module: DecisionModule, hidden: torch.Tensor, text_pos: torch.Tensor, vision_pos: torch.Tensor, text_mask
) -> torch.Tensor:
    """Run ``module`` on a decoder layer's output ``hidden`` (B, N, C): the vision tokens at ``vision_pos`` (B, V)
    against the text tokens at ``text_pos`` (B, T) where ``text_mask`` (B, T) is True -> gamma (B, V, 2)."""
    dtype = module.score.weight.dtype
    return module(gather_tokens(hidden, vision_pos).to(dtype), gather_tokens(hidden, text_pos).to(dtype), text_mask)


def keep_scores(gamma: torch.Tensor) -> torch.Tensor:
    """The keep probability ``softmax(gamma)[..., 0]`` used to rank tokens at inference (eq. 13)."""
    return gamma.float().softmax(dim=-1)[..., 0]


def gumbel_decisions(gamma: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard Gumbel-Softmax keep decisions with straight-through gradients, eqs. 5-6: (B, V, 2) -> (B, V)."""
    return F.gumbel_softmax(gamma.float(), tau=tau, hard=True, dim=-1)[..., 0]
