"""Pruning policies: how the inference engine ranks the vision tokens at each stage.

The learned LVPruning decision modules are one policy; training-free baselines plug into the same engine, so
they prune at the same stages, with the same keep counts and the same FLOPs accounting.
Shapes: B batch, N current tokens, V vision tokens still kept, T text tokens, C hidden size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from lvpruning.decision import keep_scores

if TYPE_CHECKING:
    from lvpruning.engine import LVPruningModel, _Sequence


class PruningPolicy(Protocol):
    name: str

    def scores(
        self,
        pruner: LVPruningModel,
        stage: int,
        seq: _Sequence,
        layer_input: torch.Tensor,
        text_pos: torch.Tensor,
        vision_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Keep scores (B, V) for the vision tokens at ``vision_pos``; the top-k are kept.

        ``seq.hidden`` is the output of the stage's decoder layer and ``layer_input`` (B, N, C) its input."""
        ...


class LearnedPolicy:
    """LVPruning: the stage's decision module scores vision tokens against the instruction (eqs. 1-4, 13)."""

    name = "lvpruning"

    def scores(self, pruner, stage, seq, layer_input, text_pos, vision_pos) -> torch.Tensor:
        return keep_scores(pruner.decision_gamma(stage, seq, text_pos, vision_pos))


class RandomPolicy:
    """Uniformly random vision tokens: the baseline that language guidance must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def scores(self, pruner, stage, seq, layer_input, text_pos, vision_pos) -> torch.Tensor:
        device = vision_pos.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(vision_pos.shape, generator=self._generators[device], device=device)


class FastVPolicy:
    """FastV-style, training-free: rank vision tokens by the attention that the last instruction token pays them
    in the stage's decoder layer (Chen et al., 2024), averaged over heads. The attention row is recomputed from
    the layer's input, so the model keeps its own attention implementation (no switch to eager)."""

    name = "fastv"

    def scores(self, pruner, stage, seq, layer_input, text_pos, vision_pos) -> torch.Tensor:
        positions = torch.arange(seq.instruction.shape[1], device=vision_pos.device)
        last = (seq.instruction * positions).argmax(dim=1)  # (B,) last instruction token
        padding = seq.padding
        attention = pruner.adapter.query_attention(pruner.config.layers[stage], layer_input, seq.position_ids, last)
        attention = attention.masked_fill(~padding, 0.0)  # (B, N)
        return attention.gather(1, vision_pos)


POLICIES = {"lvpruning": LearnedPolicy, "random": RandomPolicy, "fastv": FastVPolicy}


def get_policy(name: str, seed: int = 0) -> PruningPolicy:
    """A policy by its name in MLflow's ``method`` param: ``lvpruning``, ``random`` or ``fastv``."""
    if name not in POLICIES:
        raise ValueError(f"unknown pruning policy {name!r}; choose from {sorted(POLICIES)}")
    return RandomPolicy(seed) if name == "random" else POLICIES[name]()
