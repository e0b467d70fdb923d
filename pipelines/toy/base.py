"""The toy world on disk for the jobs: its data (written once), the untrained toy LLaVA that the ``base`` stage
starts from, and the trained base model: ``<toy_root>/base_model`` when this machine trained one, else the one
shipped in the repository (``pipelines/toy/base_model``, trained by ``jobs/configs/toy_base.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.config import DataSection
from pipelines.toy.model import build_toy_model, save_toy_model, toy_processor
from pipelines.toy.writer import ToyWorldPaths, write_toy_world

SHIPPED_BASE_MODEL = Path(__file__).parent / "base_model"


@dataclass(frozen=True)
class ToyWorld:
    paths: ToyWorldPaths  # the data: instruction JSON + images for training, benchmark files for test
    root: Path
    seed: int

    @property
    def base_model(self) -> Path:
        """Where this machine's ``base`` stage writes the trained base model."""
        return self.root / "base_model"

    def trained_base(self) -> Path | None:
        """The trained base model: this machine's, else the shipped one, else None."""
        for path in (self.base_model, SHIPPED_BASE_MODEL):
            if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
                return path
        return None

    def init_model(self) -> Path:
        """The randomly initialised toy model (and its processor) that the ``base`` stage trains, saved once."""
        path = self.root / "init_model"
        if not (path / "model.safetensors").is_file():
            save_toy_model(path, build_toy_model(seed=self.seed), toy_processor())
        return path


def prepare_toy_world(data: DataSection) -> ToyWorld:
    """Write (or reuse) the toy world under ``data.toy_root``."""
    root = Path(data.toy_root)
    paths = write_toy_world(
        root / "world", seed=data.seed, n_train=data.toy_train_samples, n_test=data.toy_test_samples
    )
    return ToyWorld(paths, root, data.seed)
