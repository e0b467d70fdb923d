"""Merging ("recycling") primitives: the dropped vision tokens folded into kept ones or aggregated into new ones.

Both are matmuls (a one-hot or weight matrix times the tokens), so ``lvpruning.flops`` counts them like the model's
own: :func:`nearest` is ``2 n m D`` FLOPs, :func:`group_sum` ``2 G n C``. Shapes: B batch, n tokens to place, m
candidates, G groups, C and D feature widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest(features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index (B, n) of the most cosine-similar candidate (B, m, D) of each token (B, n, D); ties go to the first."""
    similarity = F.normalize(features.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).transpose(1, 2)
    return similarity.argmax(dim=-1)


def group_sum(
    values: torch.Tensor, groups: torch.Tensor, num_groups: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (weighted) sum of the tokens ``values`` (B, n, C) whose ``groups`` (B, n) id is ``g``, and the
    total weight (the count when ``weights`` is None): (B, G, C) and (B, G). An id outside [0, G) joins no group."""
    ids = torch.where((groups >= 0) & (groups < num_groups), groups, num_groups)  # the rest to a spare column
    member = values.new_zeros(*groups.shape, num_groups + 1, dtype=torch.float32)
    member = member.scatter(2, ids[..., None], 1.0)[..., :num_groups].transpose(1, 2)  # (B, G, n) one-hot
    if weights is not None:
        member = member * weights.float()[:, None, :]
    return member @ values.float(), member.sum(dim=-1)


def group_sum_flops(num_tokens: int, num_groups: int, width: int) -> int:
    """Matmul FLOPs of :func:`group_sum`."""
    return 2 * num_groups * num_tokens * width


def nearest_flops(num_tokens: int, num_candidates: int, width: int) -> int:
    """Matmul FLOPs of :func:`nearest`."""
    return 2 * num_tokens * num_candidates * width
