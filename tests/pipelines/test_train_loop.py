"""The DeepSpeed engine the Ray Train workers build applies the update that plain PyTorch would: ZeRO-2 over 2
gloo ranks with gradient accumulation, clipping, AdamW and the warm-up + cosine schedule, checked against a
single-process loop over the same micro-batches (every stage: every parameter, decision modules only, a Region
Focus Module only). A fresh
engine restored from the job's checkpoint of the next-to-last step takes the same last step as the engine that
saved it, at 2 ranks and at 1 (an elastic resume: the same global batch, twice the accumulation)."""

from __future__ import annotations

import math
import os
import socket
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

import lvpruning.engine
from pipelines.config import JobConfig, load_config
from pipelines.toy.model import build_toy_model, save_toy_model, toy_processor
from pipelines.train.worker import (
    ENGINE_TAG,
    TrainState,
    deepspeed_config,
    full_optimizer_state,
    read_checkpoint,
    setup_engine,
    setup_model,
    write_checkpoint,
)

WORLD, ACCUMULATION, MICRO, STEPS = 2, 2, 2, 3
OVERRIDES = [
    f"scaling.num_workers=[1,{WORLD}]",
    f"train.micro_batch_size={MICRO}",
    f"train.global_batch_size={WORLD * ACCUMULATION * MICRO}",
    "train.learning_rate=1e-2",
    "train.warmup_ratio=0.34",  # 2 warm-up steps of 3 (ceil), then cosine
    "train.lr_schedule=cosine",
    "train.weight_decay=0.1",
    "train.max_grad_norm=0.5",  # small enough to clip
]

# The Region Focus Module of the toy's 4 layers: copies of layers 1-3 run from the embeddings, so unlike the LLM's
# (copies of 0-3 would be the LLM itself, at its zero-loss optimum from the start), both distilled.
STAGE_OVERRIDES = {"region_focus": ["region_focus.layers=[2,3]", "region_focus.skipped=[]"]}


def micro_batches(config, seed: int) -> list[list[list[dict[str, torch.Tensor]]]]:
    """[step][rank][micro] batches: ``[BOS, 5 words, <image> x 64, 6 words]``, the last 3 tokens supervised."""
    g = torch.Generator().manual_seed(seed)
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2

    def batch() -> dict[str, torch.Tensor]:
        words = torch.randint(10, config.text_config.vocab_size, (MICRO, 11), generator=g)
        image = torch.full((MICRO, n_image), config.image_token_id)
        input_ids = torch.cat([torch.ones(MICRO, 1, dtype=torch.long), words[:, :5], image, words[:, 5:]], 1)
        labels = torch.full_like(input_ids, -100)
        labels[:, -3:] = input_ids[:, -3:]
        size = config.vision_config.image_size
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "pixel_values": torch.randn(MICRO, 3, size, size, generator=g),
        }

    return [[[batch() for _ in range(ACCUMULATION)] for _ in range(WORLD)] for _ in range(STEPS)]


def noiseless_decisions(gamma: torch.Tensor, tau: float) -> torch.Tensor:
    """``gumbel_decisions`` without the Gumbel noise (which differs per rank): straight-through hard softmax."""
    soft = torch.softmax(gamma.float() / tau, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def _rank(rank: int, port: int, cfg_json: dict, model_path: str, batches, out: str) -> None:
    import deepspeed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = JobConfig.model_validate(cfg_json)

    def engine_and_module():
        torch.manual_seed(cfg.train.seed + rank)  # as the worker loop does: DeepSpeed starts every rank from rank 0's
        module, params = setup_model(cfg, model_path, torch.device("cpu"))
        return setup_engine(cfg, module, params, STEPS, deepspeed_config(cfg))[0], module

    def take_step(engine, step) -> None:
        for batch in step[rank]:
            engine.backward(engine(**batch).loss)
            engine.step()

    def trained(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    checkpoint = os.path.join(os.path.dirname(out), "checkpoint")
    with mock.patch.object(lvpruning.engine, "gumbel_decisions", noiseless_decisions):
        engine, module = engine_and_module()
        for step in batches[:-1]:
            take_step(engine, step)
        write_checkpoint(checkpoint, engine, module, TrainState(step=STEPS - 1), cfg, model_path)
        take_step(engine, batches[-1])
        restored, restored_module = engine_and_module()
        state = read_checkpoint(checkpoint, restored)
        take_step(restored, batches[-1])
    adam = full_optimizer_state(engine, module)["params"]
    if rank == 0:
        saved = {"trained": trained(module), "resumed": trained(restored_module), "step": state.step, "adam": adam}
        torch.save(saved, out)


def _alone(rank: int, port: int, cfg_json: dict, model_path: str, batches, out: str) -> None:
    """One rank restores the 2-rank checkpoint and takes the last step on both ranks' micro-batches."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = JobConfig.model_validate(cfg_json)
    with mock.patch.object(lvpruning.engine, "gumbel_decisions", noiseless_decisions):
        module, params = setup_model(cfg, model_path, torch.device("cpu"))
        ds_config = {**deepspeed_config(cfg), "gradient_accumulation_steps": cfg.gradient_accumulation_steps(1)}
        engine = setup_engine(cfg, module, params, STEPS, ds_config)[0]
        state = read_checkpoint(os.path.join(os.path.dirname(out), "checkpoint"), engine)
        for batch in [batch for per_rank in batches[-1] for batch in per_rank]:
            engine.backward(engine(**batch).loss)
            engine.step()
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    adam = full_optimizer_state(engine, module)["params"]
    torch.save({"trained": trained, "step": state.step, "adam": adam}, out)


def reference(cfg: JobConfig, model_path: str, batches) -> dict[str, torch.Tensor]:
    """One process: the loss of every micro-batch / (ranks x accumulation), norm clipping by hand, AdamW at the
    learning rate of a linear warm-up then a cosine to 0 (written out, not Hugging Face's scheduler). Returns the
    parameters that get gradients (ZeRO also applies weight decay to the others)."""
    torch.manual_seed(cfg.train.seed)  # rank 0's decision modules
    module, params = setup_model(cfg, model_path, torch.device("cpu"))
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
    warmup = math.ceil(t.warmup_ratio * STEPS)
    named = dict(module.named_parameters())
    used: set[str] = set()
    for step, micro in enumerate(batches):
        lr = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = t.learning_rate * lr
        for per_rank in micro:
            for batch in per_rank:
                (module(**batch).loss / (WORLD * ACCUMULATION)).backward()
        used |= {n for n, p in named.items() if p.grad is not None}  # not CLIP's last layer (feature layer -2)
        norm = torch.sqrt(sum(named[n].grad.pow(2).sum() for n in used))
        for p in (named[n] for n in used):
            p.grad.mul_(min(1.0, t.max_grad_norm / (norm.item() + 1e-6)))
        optimizer.step()
        optimizer.zero_grad()
    return {n: named[n].detach() for n in used}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["base", "pruning", "region_focus"])
def test_deepspeed_zero2_over_two_ranks_matches_a_plain_pytorch_loop(stage, tmp_path, monkeypatch):
    cfg = load_config(None, [*OVERRIDES, f"train.stage={stage}", *STAGE_OVERRIDES.get(stage, ())])
    model = build_toy_model()
    model_path = str(save_toy_model(tmp_path / "model", model, toy_processor()))
    batches = micro_batches(model.config, seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(port, cfg.model_dump(mode="json"), model_path, batches, out), nprocs=WORLD)

    saved = torch.load(out, weights_only=True)
    trained = saved["trained"]
    monkeypatch.setattr(lvpruning.engine, "gumbel_decisions", noiseless_decisions)
    expected = reference(cfg, model_path, batches)
    initial = dict(model.named_parameters())
    assert trained.keys() >= expected.keys() and len(expected) > 0
    # k_proj biases have a zero gradient in exact arithmetic (softmax ignores a shift of all of a query's scores):
    # AdamW turns their rounding noise into full-size, run-dependent steps, so they are not compared.
    checked = {name: value for name, value in expected.items() if not name.endswith("k_proj.bias")}
    for name, value in checked.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if stage == "base":  # every parameter trains
        assert all(not torch.equal(value, initial[name]) for name, value in checked.items())

    # Resuming: same last step from the restored engine (parameters, AdamW moments, schedule), as in step count.
    assert saved["step"] == STEPS - 1
    assert saved["resumed"].keys() == trained.keys()
    for name, value in saved["resumed"].items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # The DeepSpeed module state holds the trainable parameters only: in stage pruning, not the frozen base model.
    # (DeepSpeed's own file, written by this test: torch.load needs weights_only=False for its metadata.)
    states = torch.load(tmp_path / "checkpoint" / ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(states["module"]) - set(states["buffer_names"]) == trained.keys()

    # Elastic: 1 rank resumes the 2 ranks' checkpoint and takes the last step on the same samples (4 micro-batches
    # accumulated instead of 2 x 2): the same parameters and AdamW moments as the 2 ranks' last step.
    alone = str(tmp_path / "alone.pt")
    mp.spawn(_alone, args=(port, cfg.model_dump(mode="json"), model_path, batches, alone), nprocs=1)
    one = torch.load(alone, weights_only=True)
    assert one["step"] == STEPS - 1 and one["trained"].keys() == trained.keys() == saved["adam"].keys()
    for name, value in one["trained"].items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for name, state in one["adam"].items():
        if name.endswith("k_proj.bias"):  # moments of rounding noise (see above), which differs with the world size
            continue
        for key, value in state.items():  # fp32 master weights, exp_avg, exp_avg_sq: to 1e-6 of each tensor's scale
            expected = saved["adam"][name][key]
            atol = 1e-6 * max(expected.abs().max().item(), 1e-30)
            torch.testing.assert_close(
                value, expected, rtol=1e-5, atol=atol, msg=lambda m, k=f"{name} {key}": f"{k}: {m}"
            )
