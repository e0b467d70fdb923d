"""The toy world on disk for the jobs: its data (written once), the untrained toy LLaVA that the ``base`` stage
starts from, and the trained base model: ``<toy_root>/base_model`` when this machine trained one, else the one
shipped in the repository (``pipelines/toy/base_model``, trained by ``jobs/configs/toy_base.yaml``).

Five variants (``data.toy_variant``): ``default``, the 64 x 64 world of the toy LLaVA; ``hires``, the
high-resolution world (``hires.HiresSpec``) of the toy LLaVA-NeXT, whose base model (``pipelines/toy/base_model_hires``
once shipped; ``jobs/configs/toy_base_hires.yaml``) starts from the toy LLaVA's (``continued_model``); ``qwen``, the
64 x 64 world of the toy Qwen2.5-VL (``jobs/configs/toy_base_qwen.yaml``: the toy LLaVA's decoder carried over,
``model.qwen_from_llava``; ``pipelines/toy/base_model_qwen`` once shipped); ``large``, the large-image world
(``writer.LARGE``: 256 x 256 images in 4 x 4 tiles), read by the high-resolution world's toy LLaVA-NeXT given the
larger tile grid (:func:`widened_grid`): the same tiles at the same resolution, more of them; ``qwen_hires``, the
high-resolution world in its three aspects (``writer.QWEN_HIRES``) of the toy Qwen2.5-VL, each image read whole at
its own size (``jobs/configs/toy_base_qwen_hires.yaml``: continued from the default world's toy Qwen2.5-VL;
shipped in ``pipelines/toy/base_model_qwen_hires``).

A trained base model carries ``toy_world.json``: the scene parameters of the world it learnt
(``writer.scene_parameters``). One whose stamp differs from the current world's, e.g. a ``<toy_root>/base_model``
left by an older version of the toy world, is not used.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2_5_VLConfig

from lvpruning import from_pretrained
from lvpruning.tiny import tiny_llava
from pipelines.toy.hires import HiresSpec, image_grid_pinpoints
from pipelines.toy.model import (
    VARIANT_FAMILIES,
    build_toy_model,
    qwen_from_llava,
    save_toy_model,
    toy_config,
    toy_processor,
)
from pipelines.toy.scenes import SceneSpec, WorldSpec
from pipelines.toy.writer import ToyWorldPaths, scene_parameters, world_spec, write_toy_world

HERE = Path(__file__).parent
SHIPPED_BASE_MODELS = {  # by data.toy_variant
    "default": HERE / "base_model",
    "hires": HERE / "base_model_hires",
    "qwen": HERE / "base_model_qwen",
    "qwen_hires": HERE / "base_model_qwen_hires",
}
SHIPPED_BASE_MODEL = SHIPPED_BASE_MODELS["default"]
WORLD_STAMP = "toy_world.json"
WIDENED_FROM = "widened_from.json"  # widened_grid: the model it copied (path, weights' size and time)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorld:
    paths: ToyWorldPaths  # the data: instruction JSON + images for training, benchmark files for test
    root: Path
    seed: int
    spec: WorldSpec = field(default_factory=SceneSpec)
    variant: str = "default"  # data.toy_variant: the world and its model's family (model.VARIANT_FAMILIES)

    @classmethod
    def at(
        cls, root: str | Path, seed: int, question_types: tuple[str, ...] | None = None, variant: str = "default"
    ) -> ToyWorld:
        """The toy world ``variant`` under ``root`` of ``question_types`` (None: the variant's own): its files'
        places, written by :meth:`written`."""
        paths = ToyWorldPaths.under(Path(root) / "world")
        return cls(paths, Path(root), seed, world_spec(variant, question_types), variant)

    @property
    def family(self) -> str:
        """The toy model's family (``model.TOY_FAMILIES``)."""
        return VARIANT_FAMILIES[self.variant]

    @property
    def shipped_base_model(self) -> Path | None:
        """Where the repository ships this variant's trained base model (None: the large world has none)."""
        return SHIPPED_BASE_MODELS.get(self.variant)

    def written(self, n_train: int, n_test: int) -> ToyWorld:
        """This world with ``n_train`` training and ``n_test`` test questions written now (or reused)."""
        paths = write_toy_world(self.paths.root, seed=self.seed, n_train=n_train, n_test=n_test, spec=self.spec)
        return replace(self, paths=paths)

    @property
    def base_model(self) -> Path:
        """Where this machine's ``base`` stage writes the trained base model."""
        return self.root / "base_model"

    def trained_base(self) -> Path | None:
        """The trained base model of this world: this machine's, else the shipped one, else None."""
        wanted = scene_parameters(self.spec)
        for path in (self.base_model, self.shipped_base_model):
            if path is None or not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
                continue
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            if model_type != toy_config(self.spec, self.family).model_type:  # e.g. a toy LLaVA in a Qwen world's root
                logger.warning("not using %s: a %s, not this world's toy model", path, model_type)
                continue
            if world_stamp(path) == wanted:
                return path
            logger.warning("not using %s: trained for another toy world (%s differs or is missing)", path, WORLD_STAMP)
        if self.variant == "large":  # the high-resolution world's model (trained under <root>/hires, or shipped)
            hires = ToyWorld.at(self.root / "hires", self.seed, None, "hires").trained_base()
            return None if hires is None else widened_grid(hires, self.spec, self.root / "hires_model")
        return None

    def stamp_base_model(self) -> None:
        """Mark ``base_model`` as trained on this world (after the ``base`` stage exported it)."""
        (self.base_model / WORLD_STAMP).write_text(json.dumps(scene_parameters(self.spec), indent=2) + "\n")

    def continued_model(self, init_from: str | Path) -> Path:
        """``init_from``'s weights with this world's processor, for the ``base`` stage to go on training (saved
        under ``<toy_root>/continued_model``). A newer world's words take new token ids, so every word the saved
        tokenizer knows must keep its id; otherwise this fails. A toy LLaVA continued into the high-resolution
        world becomes the toy LLaVA-NeXT of the same sizes: every weight carried over, the newline token new. The
        tower is made to read checkerboards (:func:`read_checkerboards`) when a flat world's model goes on in a
        high-resolution world: a toy LLaVA made a toy LLaVA-NeXT, and a toy Qwen2.5-VL stamped for a flat world
        (one without a stamp is taken as it is, with a warning)."""
        model = from_pretrained(str(init_from))
        wanted = toy_config(self.spec, self.family)
        config = wanted if type(model.config) is not type(wanted) else model.config
        processor = toy_processor(config, self.spec)
        if isinstance(config, Qwen2_5_VLConfig) and config is not model.config:  # a toy LLaVA: its decoder carried
            known = AutoTokenizer.from_pretrained(init_from)
            qwen = qwen_from_llava(model, known, tiny_llava(config, seed=self.seed), processor.tokenizer)
            return save_toy_model(self.root / "continued_model", qwen, processor)
        known, wanted = AutoTokenizer.from_pretrained(init_from).get_vocab(), processor.tokenizer.get_vocab()
        moved = sorted(w for w, i in known.items() if wanted.get(w) != i)
        if moved:
            raise ValueError(f"train.init_from: {init_from}'s tokenizer gives other ids to {moved[:10]}")
        next_from_llava = config is not model.config  # a toy LLaVA becomes a toy LLaVA-NeXT
        if next_from_llava:
            model = carried_over(model, build_toy_model(config, seed=self.seed), init_from)
        if isinstance(self.spec, HiresSpec) and (next_from_llava or flat_world_model(init_from)):
            model = read_checkerboards(model)
        return save_toy_model(self.root / "continued_model", model, processor)

    def init_model(self) -> Path:
        """The randomly initialised toy model (and its processor) that the ``base`` stage trains, saved once."""
        path = self.root / "init_model"
        if not (path / "model.safetensors").is_file():
            config = toy_config(self.spec, self.family)
            model = (
                tiny_llava(config, seed=self.seed)
                if self.family == "qwen2_5_vl"
                else build_toy_model(config, self.seed)
            )
            save_toy_model(path, model, toy_processor(config, self.spec))
        return path


def widened_grid(source: Path, spec: WorldSpec, path: Path) -> Path:
    """The toy LLaVA-NeXT at ``source`` given ``spec``'s tile grids besides its own (config and image processor:
    ``image_grid_pinpoints``; the weights do not depend on them), saved once at ``path`` and stamped as ``spec``'s
    model: a world of larger images drawn as the high-resolution world's is read tile by tile as that world's.
    Remade when ``source``'s weights change (``widened_from.json`` records which it copied)."""
    config = AutoConfig.from_pretrained(source)
    pinpoints = [list(p) for p in dict.fromkeys(map(tuple, config.image_grid_pinpoints + image_grid_pinpoints(spec)))]
    stamp = json.dumps(scene_parameters(spec), indent=2) + "\n"
    weights = (source / "model.safetensors").stat()
    origin = json.dumps({"source": str(source.resolve()), "size": weights.st_size, "mtime_ns": weights.st_mtime_ns})
    made = [path / name for name in (WIDENED_FROM, WORLD_STAMP)]
    if all(f.is_file() for f in made) and [f.read_text() for f in made] == [origin, stamp]:  # the stamp last
        return path
    processor = AutoProcessor.from_pretrained(source)
    config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints = pinpoints
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    processor.save_pretrained(path)
    shutil.copyfile(source / "model.safetensors", path / "model.safetensors")
    (path / WIDENED_FROM).write_text(origin)
    (path / WORLD_STAMP).write_text(stamp)
    return path


def carried_over(source: Any, target: Any, name: str | Path) -> Any:
    """``target`` with every weight of ``source`` (same names and shapes), its own where ``source`` has none (the
    newline token of a LLaVA-NeXT built from a LLaVA); anything else fails naming the weights."""
    weights, own = source.state_dict(), target.state_dict()
    wrong = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
    missing = sorted(set(own) - set(weights))
    if wrong or any("image_newline" not in k for k in missing):
        raise ValueError(f"train.init_from: {name} does not fit the toy model: {(wrong + missing)[:5]}")
    target.load_state_dict(weights, strict=False)
    return target


def world_stamp(path: str | Path) -> dict | None:
    """The scene parameters the model at ``path`` was trained on (its ``toy_world.json``), None without one."""
    try:
        return json.loads((Path(path) / WORLD_STAMP).read_text())
    except (OSError, ValueError):
        return None


def flat_world_model(path: str | Path) -> bool:
    """Whether the model at ``path`` is stamped as trained on a flat world (its ``toy_world.json`` has no
    ``HiresSpec`` field); False, with a warning, for one without a stamp."""
    stamp = world_stamp(path)
    if stamp is None:
        logger.warning("%s has no %s: taken as reading the high-resolution world as it is", path, WORLD_STAMP)
        return False
    return bool({f.name for f in fields(HiresSpec)} - set(stamp))  # a SceneSpec stamp lacks the tiles


def read_checkerboards(model: Any) -> Any:
    """``model`` with its tower's patch embedding reading only the even pixels of each patch (x + y even), at twice
    the weight (a LLaVA's CLIP convolution, a Qwen2.5-VL's over 2 frames alike: rows and columns are its last two
    axes). The high-resolution world draws an object's shape as a 1-pixel checkerboard whose even pixels are
    its color (``pipelines.toy.hires``), so the toy LLaVA's tower, trained on flat shapes, then sees each object as
    the flat shape it knows, in a grey box; flat regions look as before (the default world's accuracy: 97.4% ->
    95.8%, ``benchmarks/TOY_WORLD.md``). Without it the base stage stays at the answer prior for hundreds of steps."""
    tower = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    conv = tower.patch_embed.proj if hasattr(tower, "patch_embed") else tower.embeddings.patch_embedding
    rows, cols = conv.weight.shape[-2:]
    even = (torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % 2 == 0  # patches start on even pixels
    with torch.no_grad():
        conv.weight.mul_(2.0 * even.to(conv.weight.dtype))
    return model
