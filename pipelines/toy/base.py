"""The toy world on disk for the jobs: its data (written once), the untrained toy LLaVA that the ``base`` stage
starts from, and the trained base model: ``<toy_root>/base_model`` when this machine trained one, else the one
shipped in the repository (``pipelines/toy/base_model``, trained by ``jobs/configs/toy_base.yaml``).

A trained base model carries ``toy_world.json``: the scene parameters of the world it learnt
(``writer.scene_parameters``). One whose stamp differs from the current world's, e.g. a ``<toy_root>/base_model``
left by an older version of the toy world, is not used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoTokenizer, LlavaForConditionalGeneration

from pipelines.toy.model import build_toy_model, save_toy_model, toy_processor
from pipelines.toy.scenes import SceneSpec
from pipelines.toy.writer import ToyWorldPaths, scene_parameters, write_toy_world

SHIPPED_BASE_MODEL = Path(__file__).parent / "base_model"
WORLD_STAMP = "toy_world.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyWorld:
    paths: ToyWorldPaths  # the data: instruction JSON + images for training, benchmark files for test
    root: Path
    seed: int
    spec: SceneSpec = field(default_factory=SceneSpec)

    @classmethod
    def at(cls, root: str | Path, seed: int, question_types: tuple[str, ...] | None = None) -> ToyWorld:
        """The toy world under ``root`` of ``question_types`` (None: the toy world's own,
        ``SceneSpec.question_types``): its files' places, written by :meth:`written`."""
        spec = SceneSpec() if question_types is None else SceneSpec(question_types=question_types)
        return cls(ToyWorldPaths.under(Path(root) / "world"), Path(root), seed, spec)

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
        for path in (self.base_model, SHIPPED_BASE_MODEL):
            if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
                continue
            try:
                stamp = json.loads((path / WORLD_STAMP).read_text())
            except (OSError, ValueError):
                stamp = None
            if stamp == wanted:
                return path
            logger.warning("not using %s: trained for another toy world (%s differs or is missing)", path, WORLD_STAMP)
        return None

    def stamp_base_model(self) -> None:
        """Mark ``base_model`` as trained on this world (after the ``base`` stage exported it)."""
        (self.base_model / WORLD_STAMP).write_text(json.dumps(scene_parameters(self.spec), indent=2) + "\n")

    def continued_model(self, init_from: str | Path) -> Path:
        """``init_from``'s weights with this world's processor, for the ``base`` stage to go on training (saved
        under ``<toy_root>/continued_model``). A newer world's words take new token ids, so every word the saved
        tokenizer knows must keep its id; otherwise this fails."""
        model = LlavaForConditionalGeneration.from_pretrained(init_from)
        processor = toy_processor(model.config)
        known, wanted = AutoTokenizer.from_pretrained(init_from).get_vocab(), processor.tokenizer.get_vocab()
        moved = sorted(w for w, i in known.items() if wanted.get(w) != i)
        if moved:
            raise ValueError(f"train.init_from: {init_from}'s tokenizer gives other ids to {moved[:10]}")
        return save_toy_model(self.root / "continued_model", model, processor)

    def init_model(self) -> Path:
        """The randomly initialised toy model (and its processor) that the ``base`` stage trains, saved once."""
        path = self.root / "init_model"
        if not (path / "model.safetensors").is_file():
            save_toy_model(path, build_toy_model(seed=self.seed), toy_processor())
        return path
