"""Training stages: what a run trains, the numbers it logs, and what it exports. One object per stage, chosen by
``train.stage``, so the worker loop, the driver and the config have no branch on the stage's name.

- ``pruning`` (the paper's recipe): decision modules attached to a frozen base model; LM + ratio losses (eq. 12);
  exports the decision modules (safetensors + JSON).
- ``base`` (the toy world only): every parameter of the toy model (LLaVA, LLaVA-NeXT or Qwen2.5-VL); LM loss;
  exports the model.
- ``region_focus`` (LRS-VQA): a Region Focus Module beside a frozen LLaVA-family base model (``region_focus``
  section); the distillation loss; exports the module (safetensors + JSON), evaluated by LRS-VQA's pyramid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import LlavaForConditionalGeneration

from lvpruning import attach, save_decision_modules
from lvpruning.policies import NONE, PYRAMID, LearnedPolicy
from lvpruning.region_focus import DISTILLATION_TERMS, RegionFocusDistillation, save_region_focus
from pipelines.conversation import load_processor
from pipelines.images import token_types

if TYPE_CHECKING:
    from pipelines.config import JobConfig


@dataclass(frozen=True)
class PruningStage:
    name: str = "pruning"
    method: str = LearnedPolicy.name  # the MLflow ``method`` param of the run
    export_dir: str = "decision_modules"  # the usable part of a checkpoint
    exports_model: bool = False  # its export is decision modules for the base model

    def trainable(self, model: LlavaForConditionalGeneration, cfg: JobConfig) -> nn.Module:
        """The module DeepSpeed trains: fresh decision modules on the frozen model."""
        return attach(model, cfg.pruning)

    def params(self, cfg: JobConfig) -> dict[str, Any]:
        """The MLflow params that say what it trains (besides ``method`` and ``total_steps``)."""
        return {"layers": list(cfg.pruning.layers), "train_ratios": list(cfg.pruning.train_ratios)}

    def inputs(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch as the trained module takes it: ``LVPruningModel`` takes it as it is."""
        return batch

    def metrics(self, out: Any) -> dict[str, Any]:
        """What a micro-batch logs besides ``loss``: its two terms and each stage's kept fraction."""
        metrics = {"lm_loss": out.lm_loss.detach().float(), "ratio_loss": out.ratio_loss.detach().float()}
        for s, fraction in enumerate(out.keep_fractions.mean(0)):
            metrics[f"keep_fraction/stage{s}"] = fraction.float()
        return metrics

    def save(self, module: nn.Module, directory: Path, model_path: str) -> None:
        save_decision_modules(module, directory)

    def run_name(self, name: str) -> str:
        return name


@dataclass(frozen=True)
class BaseStage:
    name: str = "base"
    method: str = NONE
    export_dir: str = "model"
    exports_model: bool = True  # its export is a whole model, trained from scratch (so: the toy world only)

    def trainable(self, model: LlavaForConditionalGeneration, cfg: JobConfig) -> nn.Module:
        """Every parameter of the model."""
        return model

    def params(self, cfg: JobConfig) -> dict[str, Any]:
        return {}

    def inputs(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch as Hugging Face's own model takes it (:func:`pipelines.images.token_types`)."""
        return token_types(batch, module.config.image_token_id)

    def metrics(self, out: Any) -> dict[str, Any]:
        return {}

    def save(self, module: nn.Module, directory: Path, model_path: str) -> None:
        """The whole model with its processor, loadable by ``from_pretrained``."""
        module.save_pretrained(directory)
        load_processor(model_path).save_pretrained(directory)

    def run_name(self, name: str) -> str:
        """Its own checkpoints and answers folder, so a base run never resumes from a pruning one."""
        return f"{name}-base"


@dataclass(frozen=True)
class RegionFocusStage:
    name: str = "region_focus"
    method: str = PYRAMID
    export_dir: str = "region_focus"
    exports_model: bool = False  # its export is a module for the base model

    def trainable(self, model: LlavaForConditionalGeneration, cfg: JobConfig) -> nn.Module:
        """A fresh Region Focus Module (copies of the LLM's layers) beside the frozen model."""
        rf = cfg.region_focus
        return RegionFocusDistillation(model, rf.layers, rf.skipped, rf.temperature)

    def inputs(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def metrics(self, out: Any) -> dict[str, Any]:
        """The frozen LLM's LM loss (not optimised) and the distillation's three terms."""
        terms = {f"distill/{name}": value.float() for name, value in zip(DISTILLATION_TERMS, out.terms, strict=True)}
        return {"lm_loss": out.lm_loss.float(), **terms}

    def save(self, module: nn.Module, directory: Path, model_path: str) -> None:
        save_region_focus(module.region_focus, directory)

    def params(self, cfg: JobConfig) -> dict[str, Any]:
        rf = cfg.region_focus
        return {"layers": list(rf.layers), "skipped": list(rf.skipped), "temperature": rf.temperature}

    def run_name(self, name: str) -> str:
        """Its own checkpoints, so a region_focus run never resumes from a pruning one of the same name."""
        return f"{name}-region-focus"


Stage = PruningStage | BaseStage | RegionFocusStage
STAGES: dict[str, Stage] = {stage.name: stage for stage in (PruningStage(), BaseStage(), RegionFocusStage())}
