"""``benchmarks/hires_tiles.py``'s views: the base view alone is HF's first ``side^2`` packed features (its base
view comes first), the tiles alone everything after them, on a tiny random LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch

from benchmarks.hires_tiles import VIEWS, ViewOnly, view_ratio
from lvpruning import PruningConfig, attach
from lvpruning.tiny import tiny_llava, tiny_tiled_config
from tests.lvpruning.test_tiled import make_tiled_batch, vision_counts


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_view_alone_keeps_exactly_its_tokens(view):
    model = tiny_llava(tiny_tiled_config("llava_next", "llama", num_layers=3), seed=3)
    pruner = attach(model, PruningConfig(layers=(0,), train_ratios=(1.0,), infer_ratios=(1.0,), num_heads=4)).eval()
    sizes = [(32, 32), (32, 32)]
    batch = make_tiled_batch(model, sizes, [(3, 4), (5, 2)], seed=3)
    n = vision_counts(model, sizes)[0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ratio = view_ratio(model.config, batch["image_sizes"].tolist(), VIEWS[view])
    with torch.no_grad():
        out = pruner(**batch, keep_ratios=(ratio,), layers=(-1,), policy=ViewOnly(VIEWS[view]))
    expected = torch.arange(side * side) if view == "base view alone" else torch.arange(side * side, n)
    for kept in out.kept_vision[0]:
        assert torch.equal(kept.sort().values, expected)


def test_images_of_different_layouts_are_refused():
    model = tiny_llava(tiny_tiled_config("llava_next", "llama", num_layers=3), seed=3)
    with pytest.raises(ValueError, match="different layouts"):
        view_ratio(model.config, [[32, 32], [16, 32]], VIEWS["base view alone"])
