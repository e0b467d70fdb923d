"""Pruning policies: how the inference engine ranks the vision tokens at each stage.

LVPruning's learned decision modules are one policy; the training-free methods it is compared with plug into the
same engine, so they prune with the same stages, keep counts, batching, attention implementation and FLOPs
accounting. A policy reads a :class:`~lvpruning.stage.StageInput` and returns keep scores (B, V).

``POLICIES`` is the one list of methods; every other list is derived from it and the policies' own attributes:
``METHODS`` (what MLflow's ``method`` param takes: ``NONE``, the unpruned model, then the policies, then
``PYRAMID``, LRS-VQA's coarse-to-fine pyramid, its own model rather than a policy at the engine's stages),
``TRAINING_FREE`` (no trained weights: the baselines a sweep evaluates without training) and ``AT_TOWER``
(published at the vision-tower stage).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from lvpruning.policies.adaptinfer import AdaptInferPolicy
from lvpruning.policies.base import PruningPolicy, Schedule, scaled_layers
from lvpruning.policies.baselines import FastVPolicy, LearnedPolicy, RandomPolicy
from lvpruning.policies.ptp import PTPPolicy
from lvpruning.policies.star import StarPolicy
from lvpruning.policies.transprune import TransPrunePolicy
from lvpruning.policies.vflowopt import VFlowOptPolicy
from lvpruning.policies.visionzip import VisionZipPolicy
from lvpruning.policies.vscan import VScanPolicy

POLICIES: dict[str, type[PruningPolicy]] = {
    "lvpruning": LearnedPolicy,
    "random": RandomPolicy,
    "fastv": FastVPolicy,
    "transprune": TransPrunePolicy,
    "adaptinfer": AdaptInferPolicy,
    "star": StarPolicy,
    "vscan": VScanPolicy,
    "vflowopt": VFlowOptPolicy,
    "visionzip": VisionZipPolicy,
    "ptp": PTPPolicy,
}


NONE = "none"  # the unpruned model: no policy
PYRAMID = "lrs_vqa"  # LRS-VQA's pyramid read by its trained Region Focus Module (lvpruning.lrs_vqa.PyramidModel)
METHODS = (NONE, *POLICIES, PYRAMID)
TRAINING_FREE = tuple(name for name, policy in POLICIES.items() if not policy.trained)
AT_TOWER = tuple(name for name, policy in POLICIES.items() if policy.published.layers[0] == -1)


def is_trained(method: str) -> bool:
    """Whether ``method`` (a name of ``METHODS``) prunes with trained weights (LVPruning's decision modules)."""
    return method in POLICIES and POLICIES[method].trained


def get_policy(
    name: str,
    seed: int = 0,
    decision_modules: nn.ModuleList | None = None,
    params: Mapping[str, float] | None = None,
) -> PruningPolicy:
    """A policy by its name in ``POLICIES``; ``seed`` is the random baseline's, ``decision_modules`` LVPruning's,
    ``params`` a method's own keyword arguments (e.g. VFlowOpt's ``t``, ``alpha``, ``cell``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown pruning policy {name!r}; choose from {list(POLICIES)}")
    if POLICIES[name].trained:
        if decision_modules is None:
            raise ValueError(f"policy {name!r} scores with trained decision modules: pass decision_modules")
        if params:
            raise ValueError(f"policy {name!r} has no parameters; it scores with its trained decision modules")
        return POLICIES[name](decision_modules)
    kwargs = {"seed": seed} if POLICIES[name].seeded else {}
    accepted = set(inspect.signature(POLICIES[name]).parameters) - set(kwargs)
    unknown = sorted(set(params or {}) - accepted)
    if unknown:
        raise ValueError(f"policy {name!r} has no parameters {unknown}; it takes {sorted(accepted) or 'none'}")
    return POLICIES[name](**kwargs, **(params or {}))


__all__ = [
    "AT_TOWER",
    "METHODS",
    "NONE",
    "POLICIES",
    "PYRAMID",
    "TRAINING_FREE",
    "AdaptInferPolicy",
    "FastVPolicy",
    "LearnedPolicy",
    "PTPPolicy",
    "PruningPolicy",
    "RandomPolicy",
    "Schedule",
    "StarPolicy",
    "TransPrunePolicy",
    "VFlowOptPolicy",
    "VScanPolicy",
    "VisionZipPolicy",
    "get_policy",
    "is_trained",
    "scaled_layers",
]
