"""Decision modules round-trip through safetensors + JSON, in a fresh process, and refuse the wrong model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvpruning import load_decision_modules, save_decision_modules
from lvpruning.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_pruning_config
from lvpruning.tiny import tiny_llava, tiny_llava_config
from tests.lvpruning.conftest import make_batch, make_pruner

ROOT = Path(__file__).resolve().parents[2]

RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration
from lvpruning import load_decision_modules
base, modules, batch, out = sys.argv[1:]
pruner = load_decision_modules(LlavaForConditionalGeneration.from_pretrained(base).eval(), modules).eval()
with torch.no_grad():
    result = pruner(**load_file(batch), keep_ratios=(0.6, 0.3, 0.2))
save_file({"logits": result.logits.contiguous()}, out)
"""


def test_reload_in_a_new_process_gives_identical_outputs(tmp_path):
    pruner = make_pruner(seed=11)
    with torch.no_grad():  # perturb so the saved modules are not just a fresh initialisation
        for p in pruner.decision_modules.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pruner.model.save_pretrained(tmp_path / "base")
    save_decision_modules(pruner, tmp_path / "modules")
    assert (tmp_path / "modules" / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "modules" / CONFIG_NAME).read_text())["pruning_config"]["layers"] == [
        0,
        1,
        2,
    ]
    batch = make_batch([(2, 5), (4, 3)], seed=2)
    save_file(batch, tmp_path / "batch.safetensors")
    with torch.no_grad():
        expected = pruner(**batch, keep_ratios=(0.6, 0.3, 0.2)).logits
    subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            str(tmp_path / "base"),
            str(tmp_path / "modules"),
            str(tmp_path / "batch.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        check=True,
        cwd=ROOT,
    )
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], expected)


@pytest.mark.parametrize(
    "change, field", [({"hidden_size": 32}, "hidden_size"), ({"num_layers": 6}, "num_hidden_layers")]
)
def test_wrong_model_is_refused_with_a_clear_error(tmp_path, change, field):
    save_decision_modules(make_pruner(), tmp_path)
    other = tiny_llava(tiny_llava_config(**{"num_layers": 5, **change}))
    with pytest.raises(ValueError, match=f"{field}="):
        load_decision_modules(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an LVPruning"):
        load_decision_modules(other, tmp_path / "missing")


def test_read_pruning_config_reads_the_saved_config_and_names_a_missing_file(tmp_path):
    pruner = make_pruner()
    save_decision_modules(pruner, tmp_path)
    assert read_pruning_config(tmp_path) == pruner.config
    with pytest.raises(FileNotFoundError, match=f"missing/{CONFIG_NAME} not found"):
        read_pruning_config(tmp_path / "missing")
