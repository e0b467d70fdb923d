"""The cross-attention decision module (paper section 3.1, eqs. 1-4).

Vision tokens are the queries, instruction text tokens the keys and values. Shapes:
B batch, V vision tokens scored, T text tokens, C hidden size, h heads, d = C / h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionBlock(nn.Module):
    """``O = softmax(Q K^T / sqrt(d)) V + Q`` (eq. 3), then the FFN [LN, Linear(C, F), SiLU, Linear(F, C), LN]."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)  # W_q, eq. 1
        self.k_proj = nn.Linear(hidden_size, hidden_size)  # W_k, eq. 2
        self.v_proj = nn.Linear(hidden_size, hidden_size)  # W_v, eq. 2
        self.ffn = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, ffn_dim),
            nn.SiLU(),
            nn.Linear(ffn_dim, hidden_size),
            nn.LayerNorm(hidden_size),
        )

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, V, C = vision.shape
        T = text.shape[1]
        q = self.q_proj(vision)  # (B, V, C)
        qh = q.view(B, V, self.num_heads, -1).transpose(1, 2)  # (B, h, V, d)
        kh = self.k_proj(text).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, h, T, d)
        vh = self.v_proj(text).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, h, T, d)
        attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=text_mask[:, None, None, :])  # (B, h, V, d)
        out = attn.transpose(1, 2).reshape(B, V, C) + q  # eq. 3
        return out + self.ffn(out)


class DecisionModule(nn.Module):
    """Scores each vision token for keeping (``gamma[..., 0]``) or removing (``gamma[..., 1]``), eq. 4.

    Decoder hidden states grow large in middle layers, so both inputs pass a LayerNorm first (as DynamicViT's
    predictor does); this is the one addition to the paper's description.
    """

    def __init__(self, hidden_size: int, num_blocks: int = 2, num_heads: int = 8, ffn_dim: int | None = None):
        super().__init__()
        self.vision_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(hidden_size, num_heads, ffn_dim or 2 * hidden_size) for _ in range(num_blocks)
        )
        self.score = nn.Linear(hidden_size, 2)  # W_O, eq. 4

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """vision (B, V, C), text (B, T, C), text_mask (B, T) bool of real instruction tokens -> gamma (B, V, 2)."""
        x = self.vision_norm(vision)
        t = self.text_norm(text)
        for block in self.blocks:
            x = block(x, t, text_mask)
        return self.score(x)


def keep_scores(gamma: torch.Tensor) -> torch.Tensor:
    """The keep probability ``softmax(gamma)[..., 0]`` used to rank tokens at inference (eq. 13)."""
    return gamma.float().softmax(dim=-1)[..., 0]


def gumbel_decisions(gamma: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard Gumbel-Softmax keep decisions with straight-through gradients, eqs. 5-6: (B, V, 2) -> (B, V)."""
    return F.gumbel_softmax(gamma.float(), tau=tau, hard=True, dim=-1)[..., 0]
