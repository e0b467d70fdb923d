"""The policy interface (``PruningPolicy``), published schedules and their mapping onto smaller decoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaConfig, PreTrainedConfig

from lvpruning.stage import LayerRecord, MergePlan, StageInput, StageShape

REFERENCE_LAYERS = 32  # LLaVA-1.5-7B's decoder, where the published settings apply


@dataclass(frozen=True)
class Schedule:
    """Where a method prunes and how much: after zero-based decoder ``layers``, keeping ``ratios`` of the original
    vision tokens (one per stage, non-increasing)."""

    layers: tuple[int, ...]
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.ratios):
            raise ValueError(f"Schedule: {len(self.layers)} layers for {len(self.ratios)} ratios")

    def on(self, num_layers: int) -> Schedule:
        """This published (32-layer) schedule on a decoder of ``num_layers`` (:func:`scaled_layers`)."""
        return Schedule(scaled_layers(self.layers, num_layers), self.ratios)


def scaled_layers(layers: tuple[int, ...], num_layers: int, reference: int = REFERENCE_LAYERS) -> tuple[int, ...]:
    """Map pruning layers of a ``reference``-layer decoder proportionally onto ``num_layers`` layers.

    Pruning after layer ``l`` (zero-based) happens at depth ``(l + 1) / reference``; on the smaller model that is
    after layer ``round((l + 1) * num_layers / reference) - 1``. The result is then made strictly increasing within
    ``[0, num_layers - 2]`` (a stage needs a layer after it), moving collided stages up, then down. On the 4-layer toy
    model TransPrune's (7, 9, 12) and AdaptInfer's (1, 10, 20) both become (0, 1, 2). The vision-tower stage ``-1``
    stays first at ``-1``.
    """
    if num_layers == reference:
        return tuple(layers)
    tower = tuple(layers[:1]) if layers and layers[0] == -1 else ()
    layers = layers[len(tower) :]
    if len(layers) > num_layers - 1:
        raise ValueError(f"{len(layers)} stages do not fit a {num_layers}-layer decoder (at most {num_layers - 1})")
    out = [min(max(round((l + 1) * num_layers / reference) - 1, 0), num_layers - 2) for l in layers]  # noqa: E741
    for s in range(1, len(out)):
        out[s] = max(out[s], out[s - 1] + 1)
    if out:
        out[-1] = min(out[-1], num_layers - 2)
    for s in range(len(out) - 2, -1, -1):
        out[s] = min(out[s], out[s + 1] - 1)
    return tower + tuple(out)


class PruningPolicy:
    """The interface. ``scores`` is required; a policy that reads earlier layers lists them in ``recorded_layers``
    and reduces each one's :class:`LayerRecord` to per-token values (B, N) in ``observe``; a merging policy
    overrides ``plan``; ``overhead_flops`` (and ``tower_flops`` at the vision-tower stage) count the matmuls it adds
    (``lvpruning.flops``' convention: 2 FLOPs per multiply-add)."""

    name: str
    published: Schedule  # the method's LLaVA-1.5-7B setting
    tower_stage: bool = False  # whether it can prune at the vision-tower stage (it reads no decoder layer there)
    tower_tiles: bool = False  # whether its vision-tower stage runs on the tiled families (LLaVA-NeXT, OneVision)
    tower_cls: bool = False  # whether its vision-tower stage reads the CLS token (CLIP: LLaVA-1.5, LLaVA-NeXT)
    tower_merged: bool = False  # whether its vision-tower stage runs on Qwen-VL's tower (merged tokens, no CLS)
    tower_free: bool = False  # whether its vision-tower stage reads nothing of the tower (runs on any family)
    per_sample_budgets: bool = False  # whether its ``plan`` keeps each sample's own k_b (``keep_counts``)
    trained: bool = False  # whether it scores with trained weights (decision modules), so needs a training run
    seeded: bool = False  # whether it draws at random: ``get_policy``'s ``seed`` reaches it

    def check_layers(self, layers: tuple[int, ...]) -> None:
        """Fail with a clear message when this method cannot prune after ``layers`` (before any model work)."""
        if layers and layers[0] == -1 and not self.tower_stage:
            raise ValueError(
                f"{getattr(self, 'name', type(self).__name__)} ranks by what a decoder layer computes: it cannot "
                "prune at the vision tower (layer -1)"
            )

    def scores(self, stage: StageInput) -> torch.Tensor:
        """Keep scores (B, V) for the vision tokens at ``stage.vision_pos``; the top-k are kept."""
        raise NotImplementedError

    def plan(self, stage: StageInput, k: int) -> MergePlan:
        """The ``k`` vision tokens kept at this stage, best first (default: the top-k of ``scores``, eq. 13, nothing
        merged; a sample's padding slots last)."""
        scores = self.scores(stage).masked_fill(~stage.vision_valid(), float("-inf"))
        return MergePlan(scores.topk(k, dim=1).indices)

    def recorded_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Decoder layers whose sub-blocks the engine records, given the schedule's pruning ``layers``."""
        return ()

    def observe(self, record: LayerRecord) -> torch.Tensor:
        """Per-token values (B, N) kept from a recorded layer; ``StageInput.records`` hands them back."""
        raise NotImplementedError(f"{type(self).__name__} records no layers")

    def overhead_flops(self, text_config: PreTrainedConfig, stage: StageShape) -> int:
        """Matmul FLOPs this policy adds at a stage, beyond the decoder layers."""
        return 0

    def tower_flops(self, config: LlavaConfig, stage: StageShape) -> int:
        """Matmul FLOPs this policy adds at the vision-tower stage (``stage.layer == -1``), given the whole
        ``LlavaConfig`` (tower, projector and decoder widths)."""
        return 0

    def record_flops(self, text_config: PreTrainedConfig, layer: StageShape) -> int:
        """Matmul FLOPs of ``observe`` on one recorded layer."""
        return 0
