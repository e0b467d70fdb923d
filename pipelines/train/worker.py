"""The Ray Train worker loop: DeepSpeed training of what ``train.stage`` names (``pipelines.stages``): the LVPruning
decision modules of a frozen base model (``pruning``), or the whole toy model (``base``).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import LlavaForConditionalGeneration, get_scheduler

from pipelines.config import JobConfig
from pipelines.stages import Stage
from pipelines.storage import load_json, local_copy
from pipelines.tracking import CheckpointedHistory
from pipelines.train.collate import PaddingCollateFn

logger = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
ENGINE_TAG = "deepspeed"
# Chaos testing: kill one worker at this optimizer step, on a run that did not start from a checkpoint, so that
# FailureConfig's restart-from-checkpoint path can be exercised on a real cluster (and in the tests).
FAIL_AT_STEP_ENV = "LVPRUNING_FAIL_AT_STEP"


@dataclass
class TrainState:
    """What a resumed run needs besides the DeepSpeed engine: progress in steps, epochs and samples."""

    step: int = 0
    epoch: int = 0
    samples: int = 0


def setup_model(cfg: JobConfig, model_path: str, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The module DeepSpeed trains and its trainable parameters (the stage's: decision modules, or every one)."""
    model = LlavaForConditionalGeneration.from_pretrained(
        local_copy(model_path), dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
    )
    module = cfg.stage.trainable(model, cfg.pruning).train()
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
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
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
    out = engine(**batch)
    return out.loss, {"loss": out.loss.detach().float(), **stage.metrics(out)}


def mean_across_workers(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    names = sorted(sums)
    values = torch.stack([sums[n].cpu() for n in names] + [torch.tensor(float(count))])
    if dist.is_initialized():
        dist.all_reduce(values)
    return {n: (values[i] / values[-1]).item() for i, n in enumerate(names)}


def write_checkpoint(directory: str, engine, module, state: TrainState, cfg: JobConfig, model_path: str) -> None:
    """Every rank writes its DeepSpeed shard: trainable parameters and their optimizer state only, since frozen
    weights (the whole base model in stage ``pruning``) are the model's own files. Rank 0 also writes the stage's
    export (``<stage.export_dir>/``) and the trainer state."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG, exclude_frozen_parameters=True)
    if engine.global_rank == 0:
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
    # DeepSpeed's own engine/optimizer files (written by this job) are read with torch.load.
    load_path, _ = engine.load_checkpoint(directory, tag=ENGINE_TAG, custom_load_fn=load_trainable)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed state ({ENGINE_TAG}/) in the checkpoint {directory}")
    return TrainState(**json.loads((Path(directory) / STATE_NAME).read_text()))


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
        state = read_checkpoint(directory, engine)
    logger.info("resumed from step %d (epoch %d)", state.step, state.epoch)
    return state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = JobConfig.model_validate(loop_config["config"])
    total_steps: int = loop_config["total_steps"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    module, params = setup_model(cfg, loop_config["model_path"], device)
    engine, scheduler = setup_engine(cfg, module, params, total_steps, loop_config["deepspeed_config"])
    state = load_checkpoint(engine)
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, 0)) if state.step == 0 else 0
    run_id = loop_config.get("mlflow_run_id") if rank == 0 else None
    history = CheckpointedHistory(loop_config["mlflow_tracking_uri"], run_id) if run_id else None

    shard = ray.train.get_dataset_shard("train")
    collate = PaddingCollateFn(loop_config["pad_token_id"], padding_side="right")
    accumulation = cfg.gradient_accumulation_steps
    samples_per_step = cfg.train.global_batch_size
    start_step, start_time = state.step, time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    micro = logged_micro = 0
    while state.step < total_steps:
        epoch_start = micro
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.micro_batch_size,
            collate_fn=collate,
            device=device,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.data.seed + 1000 * state.epoch + rank,  # a new order every epoch, reproducible
        )
        for batch in batches:
            loss, metrics = forward(engine, batch, cfg.stage)
            engine.backward(loss)
            engine.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            micro += 1
            logged_micro += 1
            if micro % accumulation:
                continue
            state.step += 1
            state.samples += samples_per_step
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
                save_checkpoint(engine, module, state, cfg, loop_config["model_path"], report or {"step": state.step})
            elif report is not None:
                ray.train.report(report)
            if last:
                break
        if micro == epoch_start:
            raise RuntimeError("the training dataset shard is empty: every record was skipped or the data is too small")
        state.epoch += 1
