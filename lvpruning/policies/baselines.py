"""LVPruning's learned policy and the two baselines every comparison needs: random tokens and FastV."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from lvpruning.adapters import attention_rows_flops
from lvpruning.decision import decide, keep_scores
from lvpruning.policies.base import PruningPolicy, Schedule
from lvpruning.stage import StageInput, StageShape

PAPER = Schedule(layers=(1, 8, 16), ratios=(0.5, 0.3, 0.1))  # LVPruning section 4.1: rho = 0.5


class LearnedPolicy(PruningPolicy):
    """LVPruning: the stage's decision module scores the vision tokens against the instruction (eqs. 1-4, 13).
    Its FLOPs are counted by ``lvpruning.flops`` from the modules' shape (``decision_module_flops``).

    At the vision-tower stage (layer -1, an extension of the paper) the module reads the input embeddings: the
    projected vision tokens against the instruction tokens' embeddings, nothing of the tower itself."""

    name = "lvpruning"
    published = PAPER
    trained = True
    tower_stage = True
    tower_tiles = True  # reads the projected tokens only: every family
    tower_free = True

    def __init__(self, decision_modules: nn.ModuleList):
        self.decision_modules = decision_modules

    def scores(self, stage: StageInput) -> torch.Tensor:
        module = self.decision_modules[stage.stage]
        return keep_scores(decide(module, stage.hidden_out, stage.text_pos, stage.vision_pos, stage.text_mask()))


class RandomPolicy(PruningPolicy):
    """Uniformly random vision tokens: the baseline that language guidance must beat.

    Deterministic per sample: each sample's scores come from a generator seeded by ``seed``, the stage and a hash of
    the sample itself (its instruction tokens, so neither padding nor generated tokens, and its image), and are
    indexed by the vision tokens' original index, so a sample keeps the same tokens alone or in any batch, at any
    position, on any device."""

    name = "random"
    published = PAPER
    tower_stage = True
    tower_tiles = True  # reads no tower: every family
    tower_free = True
    seeded = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def sample_seed(self, instruction_ids: torch.Tensor, pixels: torch.Tensor, stage: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{stage}".encode(), digest_size=8)
        digest.update(instruction_ids.cpu().numpy().astype(np.int64).tobytes())
        digest.update(pixels.float().cpu().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") & (2**63 - 1)

    def scores(self, stage: StageInput) -> torch.Tensor:
        if stage.vision_pos.is_meta:  # FLOPs counting on meta: no values to hash, and random costs no matmul
            return torch.zeros(stage.vision_pos.shape, device="meta")
        token_ids = stage.input_ids.gather(1, stage.token_index)  # (B, N)
        rows = []
        for b in range(stage.vision_pos.shape[0]):
            instruction_ids = token_ids[b][stage.instruction[b]]
            n = int(stage.vision_counts[b])  # the sample's own vision tokens, and its own tiles: as alone
            seed = self.sample_seed(instruction_ids, real_tiles(stage.pixel_values[b]), stage.stage)
            per_token = torch.rand(n, generator=torch.Generator().manual_seed(seed))  # (n_b,)
            rows.append(per_token[stage.vision_index[b].cpu().clamp_max(n - 1)])  # empty slots: never kept
        return torch.stack(rows).to(stage.vision_pos.device)  # (B, V)


def real_tiles(pixels: torch.Tensor) -> torch.Tensor:
    """One sample's pixels without the all-zero tiles a batch pads (B, tiles, 3, H, W) with; (3, H, W) as is."""
    if pixels.dim() == 3:
        return pixels
    used = pixels.flatten(1).ne(0).any(dim=1).nonzero()
    return pixels[: int(used[-1]) + 1 if len(used) else 0]


class FastVPolicy(PruningPolicy):
    """FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"; pkunlp-icler/FastV): after layer K,
    keep the vision tokens that the last token attends to most in that layer, averaged over heads:

        s_j = (1 / H) sum_h A^(K)_h[last, j]

    The row is recomputed from the layer's input (``StageInput.attention``); the model keeps its own attention.
    Published: K = 2, R = 50% (drop half the image tokens after the second layer)."""

    name = "fastv"
    published = Schedule(layers=(1,), ratios=(0.5,))

    def scores(self, stage: StageInput) -> torch.Tensor:
        positions = torch.arange(stage.instruction.shape[1], device=stage.vision_pos.device)
        last = (stage.instruction * positions).argmax(dim=1, keepdim=True)  # (B, 1) the last instruction token
        rows = stage.attention(last).mean(dim=1)[:, 0]  # (B, N), mean over heads
        return rows.gather(1, stage.vision_pos)

    def overhead_flops(self, text_config, stage: StageShape) -> int:
        return attention_rows_flops(text_config, 1, stage.num_tokens)
