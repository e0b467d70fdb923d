"""A job config resolved once: every wing below the jobs reads this and never rewrites it.

``resolve`` runs in the job's process before any cluster work. It fixes what the YAML leaves to the machine: the
model's shape (read from its ``config.json`` or the toy model's, never the weights), every local path made absolute
(Ray workers, Tune trials and actors have their own working directories), the MLflow tracking URI, the toy world's
files for the toy model, the answers folder, and what the ``base`` stage evaluates (the base model alone). A sweep
trial derives its own ``Job`` from the sweep's with :meth:`Job.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlavaConfig

from lvpruning.config import check_schedule
from lvpruning.policies import PYRAMID
from lvpruning.presets import load_llava_config
from lvpruning.region_focus import check_layers
from pipelines.config import TOY, JobConfig, PyramidSection
from pipelines.storage import is_s3
from pipelines.toy.base import ToyWorld
from pipelines.toy.model import VARIANT_FAMILIES, toy_config
from pipelines.toy.writer import ToyWorldPaths, world_spec
from pipelines.tracking import resolve_uri

PYRAMID_FAMILY = "llava_next"  # the model type LRS-VQA's pyramid runs on (lvpruning.lrs_vqa.PyramidModel)
REGION_FOCUS_FAMILIES = ("llava", "llava_next", "llava_onevision")  # lvpruning.region_focus: LlavaAdapter's


@dataclass(frozen=True)
class Job:
    """The resolved config of one job (or one sweep trial) and the shape of its model."""

    config: JobConfig
    model_config: LlavaConfig  # the base model's (read without the weights)
    base: str | None = None  # the base model as a sweep's driver fixed it for its trials, readable on every node

    @property
    def num_layers(self) -> int:
        return self.model_config.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model_config.text_config.hidden_size

    @property
    def is_toy(self) -> bool:
        return self.config.model.name_or_path == TOY

    @property
    def toy_world(self) -> ToyWorld | None:
        """The toy world of ``data`` (for the toy model; written by ``pipelines.train.experiment.prepare_model``)."""
        d = self.config.data
        return ToyWorld.at(d.toy_root, d.seed, d.toy_question_types, d.toy_variant) if self.is_toy else None

    @property
    def base_model(self) -> str:
        """The frozen base model: ``model.name_or_path``, or the toy world's trained base model (cached or shipped;
        ``prepare_model`` trains one when there is none); :attr:`base` where a sweep's driver fixed it."""
        if self.base is not None:
            return self.base
        world = self.toy_world
        if world is None:
            return self.config.model.name_or_path
        trained = world.trained_base()
        if trained is None:
            raise FileNotFoundError(f"no trained toy base model under {world.base_model}: run jobs/train.py first")
        return str(trained)

    def replace(self, **sections: Any) -> Job:
        """This job with whole sections replaced (``run=..., eval=..., pruning=...``): a sweep trial's job. The
        sections come from this resolved config, so their paths are absolute already."""
        return Job(self.config.model_copy(update=sections), self.model_config, self.base)

    def with_base(self, base: str) -> Job:
        """This job with its base model fixed (a sweep's trials, on any node, use the one its driver prepared)."""
        return Job(self.config, self.model_config, base)


def model_config(name_or_path: str, toy_variant: str = "default") -> LlavaConfig:
    """The config of ``model.name_or_path``: the toy model's (of the ``data.toy_variant`` world), a preset's, a hub
    id's or directory's ``config.json``."""
    if name_or_path == TOY:
        return toy_config(world_spec(toy_variant), VARIANT_FAMILIES[toy_variant])
    return load_llava_config(name_or_path)


def resolve(cfg: JobConfig, *, model: str | None = None, modules: str | None = None) -> Job:
    """``cfg`` resolved for a job (``model`` and ``modules`` override ``model.name_or_path`` and ``eval.modules``):
    checked against the model's shape, with absolute local paths, the tracking URI, and the toy world's files.
    Fails with the key's name before any cluster work."""
    if model is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": model})})
    shape = model_config(cfg.model.name_or_path, cfg.data.toy_variant)
    text = shape.text_config
    cfg.pruning.check_model(text.num_hidden_layers, text.hidden_size)
    if cfg.train.stage == "region_focus":  # a LLaVA family, layers its LLM has (the section checked the rest)
        if shape.model_type not in REGION_FOCUS_FAMILIES:
            raise ValueError(
                f"train.stage 'region_focus': the Region Focus Module supports {list(REGION_FOCUS_FAMILIES)}, "
                f"{cfg.model.name_or_path} is a {shape.model_type}"
            )
        try:
            check_layers(cfg.region_focus.layers, text.num_hidden_layers)
        except ValueError as e:
            raise ValueError(f"region_focus.layers ({cfg.model.name_or_path}): {e}") from None
    for i, own in enumerate(cfg.eval.at_own_layers):
        for schedule in own.schedules:
            try:
                check_schedule(own.layers, schedule, text.num_hidden_layers)
            except ValueError as e:
                raise ValueError(f"eval.at_own_layers[{i}] ({own.method}): {e}") from None
    d, r, e, t = cfg.data, cfg.run, cfg.eval, cfg.train
    toy = cfg.model.name_or_path == TOY
    world = ToyWorldPaths.under(Path(d.toy_root).resolve() / "world") if toy else None  # its files, not written
    data = {"toy_root": local(d.toy_root), "train_json": local(d.train_json), "image_root": local(d.image_root)}
    if world is not None:  # the toy world's files unless given (e.g. a copy of its images on s3://)
        data |= {"train_json": data["train_json"] or str(world.train_json)}
        data |= {"image_root": data["image_root"] or str(world.image_folder)}
    benchmarks = {
        name: b.model_copy(update={k: local(getattr(b, k)) for k in ("questions", "image_root", "annotations")})
        for name, b in e.data.items()
    }
    evaluation: dict[str, Any] = {"output_dir": local(cfg.answers_dir), "data": benchmarks}
    evaluation |= {"modules": local(modules or e.modules), "toy_world": local(e.toy_world)}
    if world is not None and e.toy_world is None:
        evaluation["toy_world"] = str(world.root)
    if cfg.stage.exports_model:  # the base stage exports a model, not decision modules: evaluated alone
        evaluation["methods"] = ("none",)
    pyramid = e.lrs_vqa
    if cfg.stage.method == PYRAMID:  # its export is LRS-VQA's module: the base model, then (LLaVA-NeXT) the pyramid
        evaluation["methods"] = ("none",)
        pyramid = (pyramid or PyramidSection()) if shape.model_type == PYRAMID_FAMILY else None
    if pyramid is not None:
        if shape.model_type != PYRAMID_FAMILY:
            raise ValueError(
                f"eval.lrs_vqa: LRS-VQA's pyramid runs on LLaVA-NeXT (CLIP tiles), {cfg.model.name_or_path} is a "
                f"{shape.model_type}"
            )
        evaluation["lrs_vqa"] = pyramid.model_copy(update={"region_focus": local(pyramid.region_focus)})
    update = {
        "data": d.model_copy(update=data),
        "train": t.model_copy(update={"init_from": local(t.init_from)}),
        "scaling": cfg.scaling.model_copy(update={"deepspeed_config": local(cfg.scaling.deepspeed_config)}),
        "run": r.model_copy(update={"storage_path": local(r.storage_path), "output_dir": local(r.output_dir)}),
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": resolve_uri(cfg.mlflow.tracking_uri)}),
        "eval": e.model_copy(update=evaluation),
    }
    if not toy and Path(cfg.model.name_or_path).exists():
        update["model"] = cfg.model.model_copy(update={"name_or_path": local(cfg.model.name_or_path)})
    return Job(cfg.model_copy(update=update), shape)


def local(path: str | None) -> str | None:
    """``path`` made absolute where it is a local one; ``s3://`` paths and None as they are."""
    return path if path is None or is_s3(path) else str(Path(path).resolve())
