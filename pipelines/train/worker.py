"""The Ray Train worker loop: DeepSpeed training of what ``train.stage`` names (``pipelines.stages``): the LVPruning
decision modules of a frozen base model (``pruning``), the whole toy model (``base``), or LRS-VQA's Region Focus
Module beside a frozen base model (``region_focus``).

Everything reaches the workers through ``train_loop_config``: the resolved job config, the model path, the MLflow
run to log into (rank 0 only) and the number of optimizer steps. Every logged step is printed and is a
``ray.train.report`` (what Ray Tune's schedulers see in a sweep); at checkpoint steps it carries the DeepSpeed engine
state (for resuming) and the stage's export (for use). MLflow's per-step history is sent at checkpoints
(``CheckpointedHistory``), so that after a resume it holds each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
from transformers import get_scheduler

from lvpruning import from_pretrained
from pipelines.config import JobConfig
from pipelines.stages import Stage
from pipelines.storage import load_json, local_copy
from pipelines.tracking import CheckpointedHistory
from pipelines.train.collate import collate
from pipelines.train.data import InstructRows
from pipelines.train.order import EpochPosition, redeal, start_epoch

logger = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
FULL_STATE_NAME = "optimizer_state.pt"  # full_optimizer_state: loads at any world size, unlike DeepSpeed's partitions
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
ENGINE_TAG = "deepspeed"
# Chaos testing: kill one worker at this optimizer step, on a run that did not start from a checkpoint, so that
# FailureConfig's restart-from-checkpoint path can be exercised on a real cluster (and in the tests).
FAIL_AT_STEP_ENV = "LVPRUNING_FAIL_AT_STEP"
# Observation: each rank appends one JSON line per optimizer step, {"step", "rank", "world", "epoch", "ids": [record
# indices of that step, in order]}, to <dir>/rank<r>.jsonl (a killed attempt's steps stay there; its resume appends).
SAMPLE_LOG_ENV = "LVPRUNING_SAMPLE_LOG"


@dataclass
class TrainState:
    """What a resumed run needs besides the DeepSpeed engine: progress in steps, epochs and samples, and where the
    epoch's sample order stands (``pipelines.train.order``; None before the first checkpoint)."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    position: EpochPosition | None = None

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        values = json.loads(text)
        position = values.pop("position", None)
        return cls(**values, position=EpochPosition(**position) if position else None)


def setup_model(cfg: JobConfig, model_path: str, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The module DeepSpeed trains and its trainable parameters (the stage's: decision modules, or every one)."""
    model = from_pretrained(
        local_copy(model_path), dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
    )
    module = cfg.stage.trainable(model, cfg).train()
    if cfg.train.gradient_checkpointing:  # LVPruningModel's, or Hugging Face's for the whole model (stage base)
        module.activation_checkpointing_enable()
    module.to(device)
    return module, [p for p in module.parameters() if p.requires_grad]


def deepspeed_config(cfg: JobConfig) -> dict[str, Any]:
    """The JSON under ``cluster/deepspeed/`` with batch sizes and clipping filled in from the job config (read on
    the driver, so a missing or broken file fails before any cluster work)."""
    path = Path(cfg.scaling.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"scaling.deepspeed_config: {path} not found")
    ds = load_json(path.read_bytes(), f"scaling.deepspeed_config: {path}")
    ds.update(  # train_batch_size is checked by DeepSpeed against micro x accumulation x world size
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        # at the most workers; each worker sets its world size's (an elastic run's may differ)
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(cfg.scaling.worker_counts[-1]),
        train_batch_size=cfg.train.global_batch_size,
        gradient_clipping=cfg.train.max_grad_norm,
    )
    if ds.get("bf16", {}).get("enabled") and not cfg.scaling.use_gpu:
        raise ValueError(f"scaling.deepspeed_config: {path} enables bf16, which needs GPUs; use zero2_cpu.json")
    return ds


def setup_engine(cfg: JobConfig, module: torch.nn.Module, params: list, total_steps: int, ds_config: dict):
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.learning_rate, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay
    )
    schedule = "cosine" if cfg.train.lr_schedule == "cosine" else "constant_with_warmup"
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=params,
        config=ds_config,
        dist_init_required=False,
    )
    return engine, scheduler


def forward(engine, batch: dict[str, torch.Tensor], stage: Stage) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the loss to back-propagate and the numbers to log."""
    out = engine(**stage.inputs(engine.module, batch))
    return out.loss, {"loss": out.loss.detach().float(), **stage.metrics(out)}


def mean_across_workers(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    names = sorted(sums)
    values = torch.stack([sums[n].cpu() for n in names] + [torch.tensor(float(count))])
    if dist.is_initialized():
        dist.all_reduce(values)
    return {n: (values[i] / values[-1]).item() for i, n in enumerate(names)}


def full_optimizer_state(engine, module: torch.nn.Module) -> dict[str, Any]:
    """The trainable parameters' fp32 values and AdamW moments, whole (not ZeRO partitions), and AdamW's step count:
    a state that any data-parallel world size can load. Collective: every rank calls it."""
    params = {}
    with warnings.catch_warnings():  # DeepSpeed's gather calls a torch.distributed name torch deprecates: not ours
        warnings.filterwarnings("ignore", "`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning)
        for name, p in module.named_parameters():
            if p.requires_grad:
                params[name] = {
                    "fp32": safe_get_full_fp32_param(p).cpu(),
                    **{key: safe_get_full_optimizer_state(p, key).cpu() for key in ADAM_STATE_KEYS},
                }
    base = engine.optimizer.optimizer
    steps = [state["step"] for state in base.state.values()]
    # The groups' settings as the optimizer's own state_dict keeps them: the learning rate the schedule last set.
    groups = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    return {"params": params, "adam_step": float(steps[0]) if steps else 0.0, "param_groups": groups}


def load_full_optimizer_state(engine, module: torch.nn.Module, saved: dict[str, Any]) -> None:
    """Put ``full_optimizer_state``'s values into this engine's ZeRO partitions, at whatever world size it runs.

    AdamW creates its moments at its first step; here they are created first (at the saved step count) and linked
    to the parameters' fragments as DeepSpeed's own first step would link them."""
    zero, base = engine.optimizer, engine.optimizer.optimizer
    for group, (lp_params, flat) in enumerate(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups)):
        if base.param_groups[group]["params"] != [flat]:
            raise RuntimeError("unexpected ZeRO-2 optimizer layout: one flat fp32 partition per parameter group")
        base.param_groups[group].update(saved["param_groups"][group])
        base.state[flat] = {
            "step": torch.tensor(saved["adam_step"], dtype=torch.float32),
            **{key: torch.zeros_like(flat) for key in ADAM_STATE_KEYS},
        }
        lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if trainable.keys() != saved["params"].keys():
        raise RuntimeError(f"the optimizer state does not match the model's trainable parameters: {FULL_STATE_NAME}")
    for name, p in trainable.items():
        values = saved["params"][name]
        safe_set_full_fp32_param(p, values["fp32"].to(p.device))
        for key in ADAM_STATE_KEYS:
            safe_set_full_optimizer_state(p, values[key].to(p.device), key)


def write_checkpoint(directory: str, engine, module, state: TrainState, cfg: JobConfig, model_path: str) -> None:
    """Every rank writes its DeepSpeed shard: trainable parameters and their optimizer state only, since frozen
    weights (the whole base model in stages ``pruning`` and ``region_focus``, and the Region Focus Module's unread
    copies) are the model's own values. Rank 0 also writes the optimizer state whole (``full_optimizer_state``: what
    a resume reads, at any world size), the stage's export (``<stage.export_dir>/``) and the trainer state."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG, exclude_frozen_parameters=True)
    full = full_optimizer_state(engine, module)
    if engine.global_rank == 0:
        torch.save(full, Path(directory) / FULL_STATE_NAME)
        cfg.stage.save(module, Path(directory) / cfg.stage.export_dir, model_path)
        (Path(directory) / STATE_NAME).write_text(json.dumps(asdict(state)))


def load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load a module state saved without frozen parameters: every trainable parameter must be there, nothing else."""
    result = dst.load_state_dict(src, strict=False)
    trainable = {name for name, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def read_checkpoint(directory: str, engine) -> TrainState:
    """Restore ``engine`` at any world size: DeepSpeed's module file (trainable parameters), learning-rate schedule
    and step counters, then the whole optimizer state (not DeepSpeed's ZeRO partitions, which only load at the world
    size that wrote them)."""
    # DeepSpeed's own engine/optimizer files (written by this job) are read with torch.load.
    load_path, _ = engine.load_checkpoint(
        directory, tag=ENGINE_TAG, load_optimizer_states=False, custom_load_fn=load_trainable
    )
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed state ({ENGINE_TAG}/) in the checkpoint {directory}")
    full = torch.load(Path(directory) / FULL_STATE_NAME, weights_only=True)
    load_full_optimizer_state(engine, engine.module, full)
    return TrainState.from_json((Path(directory) / STATE_NAME).read_text())


def save_checkpoint(engine, module, state: TrainState, cfg: JobConfig, model_path: str, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, engine, module, state, cfg, model_path)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def load_checkpoint(engine) -> TrainState:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    # Each worker downloads into its own folder. Not ``checkpoint.as_directory()``: for remote storage it shares one
    # folder between the workers of a node, and a worker arriving after the first download has finished downloads
    # again into it while the others read (a truncated file, "EOFError: Ran out of input" in torch.load).
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.to_directory(directory)
        return read_checkpoint(directory, engine)


def gather_consumed(consumed: int, world: int) -> list[int]:
    """Every rank's count of consumed rows, in rank order (collective)."""
    counts = torch.zeros(world, dtype=torch.int64)
    counts[dist.get_rank() if dist.is_initialized() else 0] = consumed
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts.tolist()


def all_ranks_have(full: bool) -> bool:
    """Whether every rank has a full step of micro-batches (collective): the epoch ends for all or for none."""
    flag = torch.tensor([int(full)])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def step_batches(
    data: InstructRows, stream: list[int], micro_batch_size: int, accumulation: int
) -> Iterator[list[dict[str, np.ndarray]]]:
    """This rank's stream, encoded in order (Ray Data tasks), in groups of ``accumulation`` micro-batches; the last
    group may be short, and after it come empty ones (a rank whose stream ran out still takes part in the vote)."""
    if stream:
        batches = iter(data.encode(stream).iter_batches(batch_size=micro_batch_size, batch_format="numpy"))
        while group := list(islice(batches, accumulation)):
            yield group
    while True:
        yield []


def log_samples(directory: str | None, state: TrainState, rank: int, world: int, ids: list[int]) -> None:
    """``LVPRUNING_SAMPLE_LOG``: one JSON line per optimizer step and rank, the record indices it trained on."""
    if directory:
        line = {"step": state.step, "rank": rank, "world": world, "epoch": state.epoch, "ids": ids}
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = JobConfig.model_validate(loop_config["config"])
    total_steps: int = loop_config["total_steps"]
    data: InstructRows = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    # The global batch is fixed; accumulation follows the world size this attempt got (elastic num_workers).
    accumulation = cfg.gradient_accumulation_steps(world)
    ds_config = {**loop_config["deepspeed_config"], "gradient_accumulation_steps": accumulation}
    module, params = setup_model(cfg, loop_config["model_path"], device)
    engine, scheduler = setup_engine(cfg, module, params, total_steps, ds_config)
    state = load_checkpoint(engine)
    fresh_epoch = state.position is None  # an epoch from its start: one that makes no step is an error
    if fresh_epoch:
        position = start_epoch(data.indices, cfg.data.seed, state.epoch, world)
    else:
        logger.info(
            "resumed from step %d (epoch %d) at %d workers (checkpoint written by %d)",
            state.step,
            state.epoch,
            world,
            state.position.world,
        )
        position = redeal(state.position, world)
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, 0)) if state.step == 0 else 0
    sample_log = os.environ.get(SAMPLE_LOG_ENV)
    if sample_log:
        os.makedirs(sample_log, exist_ok=True)
    run_id = loop_config.get("mlflow_run_id") if rank == 0 else None
    history = CheckpointedHistory(loop_config["mlflow_tracking_uri"], run_id) if run_id else None

    pad_token_id = loop_config["pad_token_id"]
    micro_size = cfg.train.micro_batch_size
    samples_per_step = cfg.train.global_batch_size
    start_step, start_time = state.step, time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    logged_micro = 0
    while state.step < total_steps:
        epoch_start = state.step
        stream = position.stream(rank)
        row_of = {index: i for i, index in enumerate(stream)}
        consumed = position.consumed[rank]
        for group in step_batches(data, stream, micro_size, accumulation):
            full = len(group) == accumulation and all(len(batch["index"]) == micro_size for batch in group)
            if not all_ranks_have(full):  # a rank's stream ran short (skips): the epoch ends for every rank
                break
            ids = [int(i) for batch in group for i in batch["index"]]
            for batch in group:
                model_inputs = {n: t.to(device) for n, t in collate(batch, pad_token_id, "right").items()}
                loss, metrics = forward(engine, model_inputs, cfg.stage)
                engine.backward(loss)
                engine.step()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
                logged_micro += 1
            consumed = row_of[ids[-1]] + 1 + position.consumed[rank]  # skipped rows before the last one included
            state.step += 1
            state.samples += samples_per_step
            log_samples(sample_log, state, rank, world, ids)
            if state.step == fail_at:
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={fail_at}: injected failure at step {state.step}")
            last = state.step == total_steps
            report = None  # this step's numbers for Ray (and Tune): every logged step, with or without a checkpoint
            if state.step % cfg.train.log_every == 0 or last:
                logged = mean_across_workers(sums, logged_micro)
                sums, logged_micro = {}, 0
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(f"the loss is {logged['loss']} at step {state.step}: stopping the run")
                elapsed = time.perf_counter() - start_time
                rate = (state.step - start_step) * samples_per_step / elapsed
                logged.update(lr=scheduler.get_last_lr()[0], samples_per_second=rate, epoch=state.epoch)
                if rank == 0:
                    eta = (total_steps - state.step) * samples_per_step / max(rate, 1e-9)
                    # A log record, not print: Train V2 sends a worker's prints to the console twice.
                    logger.info(
                        f"step {state.step}/{total_steps}  loss {logged['loss']:.4f}  lr {logged['lr']:.2e}  "
                        f"{rate:.1f} samples/s  ETA {eta / 60:.1f} min"
                    )
                    if history is not None:
                        history.add(state.step, logged)
                report = {"step": state.step, **logged}
            if state.step % cfg.train.checkpoint_every == 0 or last:
                if history is not None:  # MLflow's history goes as far as the checkpoint a resume starts from
                    history.send()
                state.position = EpochPosition(position.order, world, gather_consumed(consumed, world))
                save_checkpoint(engine, module, state, cfg, loop_config["model_path"], report or {"step": state.step})
            elif report is not None:
                ray.train.report(report)
            if last:
                break
        if fresh_epoch and state.step == epoch_start and state.step < total_steps:
            raise RuntimeError("an epoch made no full step: every record was skipped or the data is too small")
        state.epoch += 1
        position, fresh_epoch = start_epoch(data.indices, cfg.data.seed, state.epoch, world), True
