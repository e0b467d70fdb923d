from __future__ import annotations

import pytest

from lvpruning import PruningConfig, paper_schedule


def test_paper_defaults():
    cfg = PruningConfig()
    assert cfg.layers == (1, 8, 16) and cfg.train_ratios == (0.5, 0.3, 0.1)
    assert (cfg.num_blocks, cfg.num_heads, cfg.ffn_dim) == (2, 8, None)
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"layers": (8, 1, 16)}, "layers"),
        ({"layers": (1, 1, 16)}, "layers"),
        ({"layers": (-2, 8, 16)}, "layers"),
        ({"layers": (1, -1, 16)}, "layers"),
        ({"layers": ()}, "layers"),
        ({"train_ratios": (0.5, 0.3)}, "train_ratios"),
        ({"train_ratios": (0.5, 0.3, 0.0)}, "train_ratios"),
        ({"infer_ratios": (1.2, 0.3, 0.1)}, "infer_ratios"),
        ({"infer_ratios": (0.3, 0.5, 0.1)}, "infer_ratios"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_heads": 0}, "num_heads"),
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"lambda_ratio": -1.0}, "lambda_ratio"),
        ({"ratio_loss": "l1"}, "ratio_loss"),
        ({"huber_beta": 0.0}, "huber_beta"),
        ({"ffn_dim": 0}, "ffn_dim"),
    ],
)
def test_impossible_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PruningConfig.{field}"):
        PruningConfig(**kwargs)


def test_unknown_keys_and_model_checks():
    with pytest.raises(ValueError, match="unknown keys.*ratio"):
        PruningConfig.from_dict({"ratio": 0.5})
    with pytest.raises(ValueError, match="PruningConfig.layers.*32 decoder layers"):
        PruningConfig(layers=(1, 8, 31)).check_model(num_layers=32, hidden_size=4096)
    with pytest.raises(ValueError, match="PruningConfig.num_heads"):
        PruningConfig(num_heads=7).check_model(num_layers=32, hidden_size=4096)


def test_paper_schedule():
    assert paper_schedule(0.5) == (0.5, 0.3, 0.1)
    assert paper_schedule(0.45) == (0.45, 0.25, 0.05)
    with pytest.raises(ValueError, match="rho=0.4"):
        paper_schedule(0.4)
