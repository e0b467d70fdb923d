"""Training-mode attention: the masked softmax of eq. 9, registered with transformers' ``AttentionInterface``.

Pruned vision tokens stay in the sequence during training (eq. 7): every query ``i`` may attend key ``j`` only with
weight ``M_ij = 1`` if ``i == j`` or ``j`` is a text token, else ``D_j``, the cumulative keep decision (eq. 10). The
softmax is taken over ``exp(A_ij) * M_ij`` (eq. 9), on top of the causal and padding masks (``A-bar`` in eq. 8).
Multiplying by ``M`` instead of adding ``log M`` keeps the straight-through gradient of ``D`` finite.

The one departure from the letter of eq. 9 is in the backward pass only. The derivative of eq. 9 with respect to a
pruned ``D_j`` is ``exp(A_ij) / sum_k exp(A_ik) M_ik``: when a pruned key scores far above every kept one (attention
sinks do), it is astronomically large, and through the masks of later layers and stages it reaches every decision
module. Measured on the toy base model, the gradient norm of the decision modules was ~1e17 for the LM loss and
~1e9 for the ratio loss; clipped to norm 1, training followed that noise, and the keep fractions swung between 0
and 1 within tens of steps. Here a pruned key's exponent is capped at the largest kept score (``MAX_EXPONENT = 0``
after the shift): its straight-through gradient is taken as if it scored no higher than the best kept key, the
gradient norms fall to ~10 and ~1, and the fractions settle at their targets (``benchmarks/TOY_WORLD.md``, fourth
round). The forward pass is eq. 9 exactly: a pruned key's weight is 0 either way.

Shapes: B batch, h heads, N queries, K keys, d head size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig

ATTN_IMPLEMENTATION = "lvpruning_masked"
MAX_EXPONENT = 0.0  # caps the exponent of pruned keys at the best kept score; kept keys sit at or below it


def masked_softmax_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    token_keep: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9. ``attention_mask`` is the boolean causal+padding mask (B, 1, N, K), True where attention is allowed;
    ``token_keep`` (B, K) is 1 for text tokens and ``D_j`` for vision tokens (carrying the gradient)."""
    if token_keep is None:
        raise ValueError(f"the '{ATTN_IMPLEMENTATION}' attention needs the token_keep decisions of eq. 7")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: repeat K/V heads
    key = key.repeat_interleave(groups, dim=1)  # (B, h, K, d)
    value = value.repeat_interleave(groups, dim=1)  # (B, h, K, d)

    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling  # A, (B, h, N, K)
    N, K = scores.shape[-2:]
    query_index = torch.arange(K - N, K, device=scores.device)  # query i is key i + (K - N)
    diagonal = query_index[:, None] == torch.arange(K, device=scores.device)[None, :]  # (N, K)
    M = torch.where(diagonal, torch.ones_like(token_keep[:, None, None, :]), token_keep[:, None, None, :].float())
    visible = scores.masked_fill(~attention_mask, float("-inf"))  # A-bar, eq. 8: causal + padding
    # Shift by the max over the kept keys, so the denominator is >= 1 (no underflow), and cap the exponent of
    # pruned keys, whose scores may lie far above: their weight is exactly 0 either way (x * M_ij = 0), but an
    # overflow would make it inf * 0 = NaN, and the cap bounds their straight-through gradient (module docstring).
    with torch.no_grad():  # a constant shift: nothing of it is saved for backward
        peak = visible.masked_fill(M <= 0, float("-inf")).amax(dim=-1, keepdim=True)
        peak = torch.nan_to_num(peak, neginf=0.0)  # rows with nothing visible (padding queries): weights become 0
    weights = torch.exp((visible - peak).clamp(max=MAX_EXPONENT)) * M  # exp(A-bar) * M, eq. 9
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, N, h, d)
    return output, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, masked_softmax_attention)


@contextmanager
def attention_implementation(config: PreTrainedConfig, name: str) -> Iterator[None]:
    """Switch a decoder config's attention implementation for the duration of one forward pass."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
