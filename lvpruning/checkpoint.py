"""Save and load decision modules: ``decision_modules.safetensors`` plus ``lvpruning_config.json``. No pickle.

The JSON records the pruning config (its module shape included: ``decision_dim``, ``num_blocks``, ...) and the shape
of the model the modules were trained for, so that loading them onto a different model or module shape fails with a
message naming the field instead of a shape error deep inside ``load_state_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lvpruning.adapters import get_adapter
from lvpruning.config import PruningConfig
from lvpruning.engine import LVPruningModel

WEIGHTS_NAME = "decision_modules.safetensors"
CONFIG_NAME = "lvpruning_config.json"
FORMAT_VERSION = 1
# The fields that decide what the modules compute; the schedules and loss weights may differ at load time.
SHAPE_FIELDS = ("layers", "decision_dim", "num_blocks", "num_heads", "ffn_dim")


def model_signature(pruner_or_model: nn.Module) -> dict:
    """What a trained module is tied to: the base model's type, its decoder's type, width and depth."""
    model = pruner_or_model.model if isinstance(pruner_or_model, LVPruningModel) else pruner_or_model
    text = get_adapter(model).text_config
    return {
        "model_type": model.config.model_type,
        "text_model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
    }


def save_modules(module: nn.Module, directory: str | Path, names: tuple[str, str], meta: dict) -> Path:
    """Write ``module``'s weights (safetensors) and ``meta`` (JSON, with the format version) to ``directory``
    under ``names`` = (weights, config); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, directory / names[0], metadata={"format": "pt"})
    (directory / names[1]).write_text(json.dumps({"format_version": FORMAT_VERSION} | meta, indent=2) + "\n")
    return directory


def read_modules(
    model: nn.Module, directory: str | Path, names: tuple[str, str], what: str, keys: Sequence[str]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The (config, weights on ``model``'s device) saved by :func:`save_modules` in ``directory``; fails naming the
    missing file (not ``what`` directory), or the field of ``keys`` where ``model`` is not the one trained for."""
    directory = Path(directory)
    for name in reversed(names):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not {what} directory")
    meta = read_metadata(directory / names[1])
    saved, actual = meta["model"], model_signature(model)
    for key in keys:
        if saved[key] != actual[key]:
            raise ValueError(
                f"{directory} holds modules trained for a model with {key}={saved[key]}, "
                f"but this model has {key}={actual[key]}"
            )
    device = next(model.parameters()).device
    return meta, load_file(directory / names[0], device=str(device))


def save_decision_modules(pruner: LVPruningModel, directory: str | Path) -> Path:
    """Write the decision modules of ``pruner`` to ``directory`` and return it."""
    meta = {"pruning_config": pruner.config.to_dict(), "model": model_signature(pruner)}
    return save_modules(pruner.decision_modules, directory, (WEIGHTS_NAME, CONFIG_NAME), meta)


def read_pruning_config(directory: str | Path) -> PruningConfig:
    """The pruning config saved beside the decision modules in ``directory``, read without loading the weights."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an LVPruning decision-module directory")
    return PruningConfig.from_dict(read_metadata(path)["pruning_config"])


def read_metadata(path: Path) -> dict:
    """``lvpruning_config.json`` as a dict; ``ValueError`` naming the file, the line and what is wrong with it."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def load_decision_modules(
    model: nn.Module, directory: str | Path, config: PruningConfig | None = None
) -> LVPruningModel:
    """Attach the decision modules saved in ``directory`` to ``model`` (a base LLaVA, loaded as usual).

    ``config`` replaces the saved pruning config (other schedules, say); it must have the saved module shape
    (``SHAPE_FIELDS``), else this fails naming the field."""
    names, keys = (WEIGHTS_NAME, CONFIG_NAME), ("hidden_size", "num_hidden_layers")
    meta, state = read_modules(model, directory, names, "an LVPruning decision-module", keys)
    hidden_size = meta["model"]["hidden_size"]
    trained = PruningConfig.from_dict(meta["pruning_config"])
    for key in SHAPE_FIELDS if config is not None else ():
        if getattr(config, key) != getattr(trained, key):
            raise ValueError(
                f"decision modules in {directory} have {key}={getattr(trained, key)}, but the pruning config asks "
                f"for {key}={getattr(config, key)}; give the saved {key} (or leave the config out)"
            )
    config = config or trained
    width = state["0.score.weight"].shape[1]  # W_O of the first module: (2, D)
    if width != config.width(hidden_size):
        raise ValueError(
            f"decision modules in {directory} are {width} wide, but their config says decision_dim="
            f"{config.decision_dim} ({config.width(hidden_size)} wide): {CONFIG_NAME} does not match {WEIGHTS_NAME}"
        )
    pruner = LVPruningModel(model, config)
    pruner.decision_modules.load_state_dict(state, strict=True)
    return pruner
