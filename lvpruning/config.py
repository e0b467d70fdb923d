"""The pruning configuration: where decision modules go, how hard they prune, how they are trained.

Every impossible value fails at construction with a message that names the field. Checks that need the model
(a layer beyond the decoder, a hidden size the heads do not divide) run in :func:`PruningConfig.check_model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


def paper_schedule(rho: float, num_stages: int = 3, step: float = 0.2) -> tuple[float, ...]:
    """The paper's keep-ratio schedule ``[rho, rho - 0.2, rho - 0.4]`` (section 4.1), rounded to 1e-6."""
    ratios = tuple(round(rho - step * s, 6) for s in range(num_stages))
    if not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(
            f"rho={rho}: the schedule {list(ratios)} leaves (0, 1]; rho must exceed {step * (num_stages - 1)}"
        )
    return ratios


def _check_ratios(name: str, ratios: tuple[float, ...], num_stages: int) -> None:
    if len(ratios) != num_stages:
        raise ValueError(f"PruningConfig.{name}: {len(ratios)} ratios for {num_stages} layers; give one per stage")
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"PruningConfig.{name}: keep ratio {r} is outside (0, 1]")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(
            f"PruningConfig.{name}: {list(ratios)} increases; keep ratios are fractions of the original vision "
            "tokens and a later stage cannot keep more than an earlier one (eq. 10)"
        )


def check_schedule(layers: tuple[int, ...], ratios: tuple[float, ...], num_layers: int) -> None:
    """Fail with a clear message unless ``ratios`` (one per stage, non-increasing, in (0, 1]) prune after the strictly
    increasing zero-based ``layers`` of a ``num_layers``-layer decoder, each followed by at least one layer. A first
    layer ``-1`` is the vision-tower stage (on the projector's output, before decoder layer 0)."""
    if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < -1 for i in layers):
        raise ValueError(
            f"pruning layers {list(layers)}: give one or more non-negative integers (-1 first: the vision tower)"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"pruning layers {list(layers)} must be strictly increasing")
    if layers[-1] >= num_layers - 1:
        raise ValueError(
            f"pruning layers {list(layers)} must be below {num_layers - 1}: the model has {num_layers} decoder "
            "layers and a stage needs at least one layer after it"
        )
    _check_ratios("infer_ratios", tuple(ratios), len(layers))


@dataclass(frozen=True)
class PruningConfig:
    """LVPruning hyperparameters (paper section 3 and 4.1).

    Attributes:
        layers: zero-based decoder layers after which a decision module runs (paper: 1, 8, 16); a first ``-1``
            puts the first module at the vision-tower stage, on the input embeddings before decoder layer 0 (not in
            the paper: see ``docs/methods.md``).
        train_ratios: target keep ratio per stage for the ratio loss, as fractions of the original vision tokens.
        infer_ratios: default keep ratio per stage at inference (can be overridden per call).
        num_blocks: cross-attention blocks per decision module (paper: 2).
        num_heads: attention heads per block (paper: 8).
        ffn_dim: FFN width; ``None`` means twice the module's width (paper: Linear(C, 2C)).
        decision_dim: the module's width D; ``None`` is the paper's full width (the LLM's hidden size C), a value
            below C projects vision and text tokens down to D after the input LayerNorms (a slim module).
        gumbel_tau: Gumbel-Softmax temperature (eq. 5).
        lambda_causal: weight of the causal LM loss (eq. 12).
        lambda_ratio: weight of the ratio loss (eq. 12).
        ratio_loss: ``"mse"`` (eq. 11) or ``"huber"`` with threshold ``huber_beta`` (the paper's experiments use 0.5).
        huber_beta: the Huber loss threshold (delta).
    """

    layers: tuple[int, ...] = (1, 8, 16)
    train_ratios: tuple[float, ...] = (0.5, 0.3, 0.1)
    infer_ratios: tuple[float, ...] = (0.5, 0.3, 0.1)
    num_blocks: int = 2
    num_heads: int = 8
    ffn_dim: int | None = None
    decision_dim: int | None = None
    gumbel_tau: float = 1.0
    lambda_causal: float = 1.0
    lambda_ratio: float = 2.0
    ratio_loss: Literal["mse", "huber"] = "huber"
    huber_beta: float = 0.5

    def __post_init__(self) -> None:
        # YAML and JSON give lists; store tuples so configs are hashable and compare equal.
        for name in ("layers", "train_ratios", "infer_ratios"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) or value is None:
                raise ValueError(f"PruningConfig.{name}: expected a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.layers:
            raise ValueError("PruningConfig.layers: at least one decision module is needed")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < -1 for i in self.layers):
            raise ValueError(
                f"PruningConfig.layers: {list(self.layers)} must be non-negative integers, or -1 first (the "
                "vision-tower stage)"
            )
        if -1 in self.layers[1:]:
            raise ValueError(
                f"PruningConfig.layers: {list(self.layers)} has -1 after another stage; the vision-tower stage "
                "(-1) can only be the first"
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"PruningConfig.layers: {list(self.layers)} must be strictly increasing")
        _check_ratios("train_ratios", self.train_ratios, len(self.layers))
        _check_ratios("infer_ratios", self.infer_ratios, len(self.layers))
        for name in ("num_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"PruningConfig.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("ffn_dim", "decision_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"PruningConfig.{name}: must be positive or null, got {getattr(self, name)}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"PruningConfig.gumbel_tau: must be positive, got {self.gumbel_tau}")
        for name in ("lambda_causal", "lambda_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"PruningConfig.{name}: must be non-negative, got {getattr(self, name)}")
        if self.ratio_loss not in ("mse", "huber"):
            raise ValueError(f"PruningConfig.ratio_loss: {self.ratio_loss!r} is not 'mse' or 'huber'")
        if self.huber_beta <= 0:
            raise ValueError(f"PruningConfig.huber_beta: must be positive, got {self.huber_beta}")

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def check_model(self, num_layers: int, hidden_size: int) -> None:
        """Fail with a named field if this config cannot be attached to a decoder of this shape."""
        if self.layers[-1] >= num_layers - 1:
            raise ValueError(
                f"PruningConfig.layers: {list(self.layers)} must be below {num_layers - 1}: the model has "
                f"{num_layers} decoder layers and a decision module needs at least one layer after it"
            )
        if self.decision_dim is not None and self.decision_dim > hidden_size:
            raise ValueError(
                f"PruningConfig.decision_dim: {self.decision_dim} exceeds the model's hidden size {hidden_size}; a "
                "slim module projects down (null: the full width)"
            )
        if self.width(hidden_size) % self.num_heads:
            what = f"decision_dim {self.decision_dim}" if self.decision_dim else f"the hidden size {hidden_size}"
            raise ValueError(f"PruningConfig.num_heads: {self.num_heads} heads do not divide {what}")

    def width(self, hidden_size: int) -> int:
        """The decision modules' width D on a model of this hidden size: ``decision_dim``, else C."""
        return self.decision_dim or hidden_size

    def check_ratios(self, ratios: tuple[float, ...] | list[float]) -> tuple[float, ...]:
        """Validate per-call inference keep ratios against this config's stages."""
        ratios = tuple(ratios)
        _check_ratios("infer_ratios", ratios, self.num_stages)
        return ratios

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PruningConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
