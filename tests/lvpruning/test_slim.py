"""Slim decision modules (``PruningConfig.decision_dim``) and activation checkpointing in training mode."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lvpruning import PruningConfig, load_decision_modules, save_decision_modules
from lvpruning.checkpoint import CONFIG_NAME
from lvpruning.decision import DecisionModule
from lvpruning.flops import decision_module_flops, measure_flops
from lvpruning.flops_cli import main
from lvpruning.presets import llava_15_7b_config
from lvpruning.tiny import tiny_llava, tiny_llava_config
from tests.lvpruning.conftest import VOCAB, make_batch, make_pruner


def documented_parameters(c: int, d: int | None, blocks: int, ffn: int | None = None) -> int:
    """README's count: LayerNorm(C) x 2; Linear(C, D) x 2 when slim; per block W_q, W_k, W_v (D x D + D each),
    FFN [LN(D), Linear(D, F), Linear(F, D), LN(D)]; W_O Linear(D, 2)."""
    width = d or c
    f = ffn or 2 * width
    norms = 2 * 2 * c
    projections = 2 * (c * width + width) if d else 0
    block = 3 * (width * width + width) + 2 * width + (width * f + f) + (f * width + width) + 2 * width
    return norms + projections + blocks * block + 2 * width + 2


@pytest.mark.parametrize("c, d, blocks, heads, ffn", [(32, 8, 1, 2, None), (32, None, 2, 4, None), (48, 16, 2, 4, 24)])
def test_a_slim_module_has_the_documented_shapes_and_parameters(c, d, blocks, heads, ffn):
    module = DecisionModule(c, num_blocks=blocks, num_heads=heads, ffn_dim=ffn, decision_dim=d)
    assert sum(p.numel() for p in module.parameters()) == documented_parameters(c, d, blocks, ffn)
    width = d or c
    assert module.score.weight.shape == (2, width)
    assert all(b.q_proj.weight.shape == (width, width) for b in module.blocks)
    if d:
        assert module.vision_proj.weight.shape == module.text_proj.weight.shape == (d, c)
    B, V, T = 3, 10, 7
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    gamma = module(torch.randn(B, V, c), torch.randn(B, T, c), mask)
    assert gamma.shape == (B, V, 2)


def test_slim_modules_at_llava_7b():
    """What README documents for LLaVA-1.5-7B: 705M parameters for three full-width modules, 23.7M slim (D 512)."""
    full = documented_parameters(4096, None, 2)
    slim = documented_parameters(4096, 512, 2)
    with torch.device("meta"):
        assert sum(p.numel() for p in DecisionModule(4096, decision_dim=512).parameters()) == slim
    assert round(3 * full / 1e6) == 705 and round(3 * slim / 1e6, 1) == 23.7


def test_slim_flops_by_hand_and_on_meta():
    c, d, q, t = 64, 16, 9, 5
    by_hand = 2 * q * c * d + 2 * t * c * d  # the two projections
    by_hand += 2 * q * d * d + 2 * 2 * t * d * d + 2 * 2 * q * t * d + 2 * 2 * q * d * (2 * d)  # one block at D
    by_hand += 2 * q * d * 2  # W_O
    assert decision_module_flops(c, q, t, num_blocks=1, decision_dim=d) == by_hand
    with torch.device("meta"):
        module = DecisionModule(c, num_blocks=1, num_heads=4, decision_dim=d)
        args = torch.randn(1, q, c), torch.randn(1, t, c), torch.ones(1, t, dtype=torch.bool)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    assert counter.get_total_flops() == by_hand


def test_the_7b_target_on_the_command_line(capsys):
    """Issue 14's target: slim modules of width 512 cost at most 0.05 TFLOPs at LLaVA-1.5-7B, rho = 0.5."""
    assert main(["--model", "llava-1.5-7b", "--rho", "0.5", "--decision-dim", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision_tflops"] <= 0.05
    assert out["agreement"]["pruned"] == 0.0  # the measured count on meta runs the slim modules
    full = PruningConfig()
    slim = PruningConfig(decision_dim=512)
    config = llava_15_7b_config()
    saved = measure_flops(config, full) - measure_flops(config, slim)
    assert saved / 1e12 == pytest.approx(0.3607 - out["decision_tflops"], abs=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decision_dim": 0}, "PruningConfig.decision_dim: must be positive"),
        ({"decision_dim": 64}, "PruningConfig.decision_dim: 64 exceeds the model's hidden size 32"),
        ({"decision_dim": 12, "num_heads": 8}, "PruningConfig.num_heads: 8 heads do not divide decision_dim 12"),
    ],
)
def test_impossible_widths_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(layers=(0, 1, 2), **kwargs).check_model(5, 32)


def test_checkpoint_records_decision_dim_and_refuses_a_full_width_config(tmp_path):
    pruner = make_pruner(decision_dim=8, num_heads=2, num_blocks=1)
    save_decision_modules(pruner, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["pruning_config"]["decision_dim"] == 8
    model = lambda: tiny_llava(tiny_llava_config(num_layers=5, vocab_size=VOCAB))  # noqa: E731
    loaded = load_decision_modules(model(), tmp_path)
    assert loaded.config.decision_dim == 8
    for a, b in zip(loaded.decision_modules.state_dict().values(), pruner.decision_modules.state_dict().values()):
        assert torch.equal(a, b)
    full_width = PruningConfig.from_dict({**pruner.config.to_dict(), "decision_dim": None})
    with pytest.raises(ValueError, match=r"have decision_dim=8, but the pruning config asks for decision_dim=None"):
        load_decision_modules(model(), tmp_path, full_width)
    other_schedule = PruningConfig.from_dict({**pruner.config.to_dict(), "infer_ratios": [0.9, 0.6, 0.3]})
    assert load_decision_modules(model(), tmp_path, other_schedule).config.infer_ratios == (0.9, 0.6, 0.3)
    # a config file edited to full width, beside slim weights
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["pruning_config"]["decision_dim"] = None
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"are 8 wide, but their config says decision_dim=None \(64 wide\)"):
        load_decision_modules(model(), tmp_path)


def gradients(pruner, batch, seed: int) -> list[torch.Tensor]:
    pruner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same Gumbel noise, so the same hard decisions
    pruner.train()(**batch).loss.backward()
    return [p.grad.clone() for p in pruner.decision_modules.parameters()]


@pytest.mark.parametrize("seed", range(3))
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less(seed):
    pruner = make_pruner(seed=seed, decision_dim=16, num_heads=2)
    g = torch.Generator().manual_seed(seed)
    lengths = [tuple(int(x) for x in torch.randint(1, 9, (2,), generator=g)) for _ in range(3)]
    batch = make_batch(lengths, seed=seed, answer_tokens=2)

    def saved_bytes() -> tuple[list[torch.Tensor], int]:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grads = gradients(pruner, batch, seed)
        return grads, total

    plain, plain_bytes = saved_bytes()
    pruner.activation_checkpointing_enable()
    checkpointed, checkpointed_bytes = saved_bytes()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in plain)
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    pruner.activation_checkpointing_disable()
    for a, b in zip(plain, gradients(pruner, batch, seed)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
