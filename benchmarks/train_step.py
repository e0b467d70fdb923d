"""Training step: memory and speed of LVPruning's training mode at the LLaVA-1.5-7B shape.

Random weights, micro-batches of 1 image (576 vision tokens) + 30 text tokens whose last 8 are the supervised
answer; one step is forward + backward + AdamW over the decision modules (after layers 1, 8, 16). Configurations:
full-width decision modules (the paper's) vs slim ones (D = 512 at 7B's width, scaled with the width), each with
activation checkpointing off and on. Reports samples/s (median over repeats), the step's peak memory (CUDA:
allocated above the memory before the step; CPU: peak RSS increase, one fresh process per configuration), the
bytes autograd saves for backward (unique storages, parameters excluded) against an analytic count, and that
count evaluated for 7B at micro-batch 4 in bf16 against an 80 GB GPU.

    python benchmarks/train_step.py --json                    # CPU, reduced width (hidden 512), fp32, batch 2
    python benchmarks/train_step.py --full --device cuda --dtype bfloat16 --batch 4 --json   # the 7B shape
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.prefill import LAYERS, benchmark_parser, machine, median_ms, reduced_7b_config  # noqa: E402
from lvpruning import PruningConfig, attach  # noqa: E402
from lvpruning.decision import DecisionModule  # noqa: E402
from lvpruning.flops import dummy_inputs, num_vision_tokens  # noqa: E402
from lvpruning.presets import llava_15_7b_config  # noqa: E402

GPU_GB = 80.0
BLOCKS, MODULE_HEADS = 2, 8  # the paper's decision modules
NOT_SAVED = ("recomputed_layer", "backward_workspace", "held_logits")  # live in the step, not saved for backward


@dataclass(frozen=True)
class Shape:
    B: int  # micro-batch
    V: int  # vision tokens
    T: int  # text tokens
    C: int  # hidden size
    I: int  # MLP intermediate size  # noqa: E741
    h: int  # attention heads
    vocab: int
    masked_layers: int  # decoder layers after the first stage, run with eq. 9's masked attention
    stages: int
    D: int | None  # decision module width when slim (None: C)
    s: int  # bytes per activation element (the model's dtype)

    @property
    def N(self) -> int:
        return self.V + self.T


def activation_bytes(x: Shape, ckpt: bool) -> dict[str, int]:
    """Bytes per training step, by term: what autograd saves for backward (from inspecting the saved tensors of
    the masked attention, Llama's layer and the decision modules), then what else is live at the peak."""
    B, N, V, T, C, h, s, f = x.B, x.N, x.V, x.T, x.C, x.h, x.s, 4  # f: the fp32 of eq. 9 and the RMSNorms
    scores = B * h * N * N  # one (B, h, N, N) attention matrix
    # clamp input, exp, exp * M in fp32; the weights (dtype s) for the value matmul; M (B, 1, N, N) fp32 and
    # the boolean mask; the (N, N) diagonal; q, k, v; the 2 RMSNorms' fp32 inputs; gate, up, SiLU out.
    layer = (3 * f + s) * scores + (f + 1) * B * N * N + N * N + (3 * s + 2 * f) * B * N * C
    layer += 3 * s * B * N * x.I + (3 * h + 2) * B * N * f
    # the first masked layer's input carries no gradient, only its decisions do: exp and exp * M, values, 1 norm
    first = 2 * f * scores + N * N + (s + f) * B * N * C + 3 * s * B * N * x.I + (2 * h + 1) * B * N * f
    D = x.D or C
    module = 2 * B * (V + T) * C + BLOCKS * (10 * B * V * D + 2 * B * T * D) + (B * (V + T) * D if x.D else 0)
    module_stats = BLOCKS * MODULE_HEADS * B * V + (2 + 4 * BLOCKS) * B * V + 2 * B * T  # fp32
    terms = {
        "decision_modules": x.stages * (s * module + f * module_stats),  # LayerNorms, projections, blocks
        "head": f * (B * N * C + B * (N - 1) * x.vocab + B * N),  # final norm, log-softmax of the LM loss
    }
    if ckpt:  # each checkpointed layer keeps its input hidden state; each stage its token_keep
        terms["layer_inputs"] = x.masked_layers * B * N * C * s + x.stages * B * N * f
        terms["recomputed_layer"] = layer  # one layer's saved tensors, alive again during its backward
    else:
        terms["masked_layers"] = first + (x.masked_layers - 1) * layer + 2 * B * N * (C // h) * s  # + cos, sin
        # the layer outputs the later decision modules gather from (in fp32 they are the next norms' inputs)
        terms["gathered_outputs"] = (x.stages - 1) * B * N * C * s if s != f else 0
    # an allowance, not counted: the loss's gradients (fp32 and logits' dtype) or eq. 9's in one layer
    terms["backward_workspace"] = max(f * B * (N - 1) * x.vocab + s * B * N * x.vocab, 3 * f * scores)
    terms["held_logits"] = B * N * x.vocab * s  # the output's logits, alive until the step ends
    return terms


def shape_of(config: LlavaConfig, batch: int, text_tokens: int, dtype: torch.dtype, decision_dim: int | None) -> Shape:
    t = config.text_config
    dims = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.vocab_size)
    after = t.num_hidden_layers - LAYERS[0] - 1
    return Shape(batch, num_vision_tokens(config), text_tokens, *dims, after, len(LAYERS), decision_dim, dtype.itemsize)


def build(args: argparse.Namespace) -> tuple[LlavaForConditionalGeneration, LlavaConfig]:
    config = llava_15_7b_config() if args.full else reduced_7b_config(args.hidden)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, args.dtype))
    return model.to(args.device).eval(), config


def label(decision_dim: int | None, ckpt: bool) -> str:
    return f"{f'slim D={decision_dim}' if decision_dim else 'full width'}, checkpointing {'on' if ckpt else 'off'}"


def measure(model: nn.Module, config: LlavaConfig, args: argparse.Namespace, dim: int | None, ckpt: bool) -> dict:
    """One configuration: ``max(1, args.warmup)`` warm-up steps (AdamW allocates its states in the first), the
    measured step (peak memory, saved tensors), then the median of ``args.repeats`` timed steps."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs = dummy_inputs(config, args.text_tokens, device)
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"], dtype=dtype)
    inputs["input_ids"] = inputs["input_ids"].clamp_min(0)
    inputs = {k: v.expand(args.batch, *v.shape[1:]).contiguous() for k, v in inputs.items()}  # (B, ...)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -args.answer_tokens :] = inputs["input_ids"][:, -args.answer_tokens :]
    pruning = PruningConfig(layers=LAYERS, num_blocks=BLOCKS, num_heads=MODULE_HEADS, decision_dim=dim)
    pruner = attach(model, pruning).to(dtype).train()
    if ckpt:
        pruner.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(pruner.decision_modules.parameters(), lr=1e-6)
    params = {p.untyped_storage().data_ptr() for p in pruner.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes: a storage saved by several ops counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(count: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext():
            out = pruner(**inputs, labels=labels)
        out.loss.backward()
        optimizer.step()

    for _ in range(max(1, args.warmup)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(count=True)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back, so that the step's increase shows
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (ru_maxrss) to now
        except OSError:
            pass  # elsewhere the peak may predate the step; the saved bytes stay exact
        before = psutil.Process().memory_info().rss
        step(count=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    ms = median_ms(step, args.repeats, 0, device)
    terms = activation_bytes(shape_of(config, args.batch, args.text_tokens, dtype, dim), ckpt)
    estimate = sum(v for k, v in terms.items() if k not in NOT_SAVED)
    grads = sum(p.numel() for p in pruner.decision_modules.parameters()) * dtype.itemsize
    pruner.detach()
    return {
        "config": label(dim, ckpt),
        "decision_dim": dim,
        "checkpointing": ckpt,
        "samples_per_s": round(args.batch / ms * 1e3, 3),
        "step_ms": round(ms, 1),
        "peak_mb": round(peak / 1e6, 1),
        "estimate_peak_mb": round((sum(terms.values()) + grads) / 1e6, 1),  # + the decision modules' grads
        "saved_mb": round(sum(saved.values()) / 1e6, 2),
        "estimate_saved_mb": round(estimate / 1e6, 2),
        "saved_over_estimate": round(sum(saved.values()) / estimate, 4),
    }


def measure_fresh(args: argparse.Namespace, decision_dim: int | None, ckpt: bool) -> dict:
    return measure(*build(args), args, decision_dim, ckpt)


def estimate_7b(batch: int = 4, text_tokens: int = 30) -> list[dict]:
    """Training memory of LLaVA-1.5-7B in bf16 as DeepSpeed's bf16 ZeRO-2 keeps it on one GPU: frozen bf16
    weights; decision modules as bf16 params and grads plus fp32 master, exp_avg and exp_avg_sq (16 B/param)."""
    config, rows = llava_15_7b_config(), []
    with torch.device("meta"):
        weights = sum(p.numel() for p in LlavaForConditionalGeneration._from_config(config).parameters())
        for decision_dim in (None, 512):
            module = DecisionModule(config.text_config.hidden_size, BLOCKS, MODULE_HEADS, None, decision_dim)
            module_params = len(LAYERS) * sum(p.numel() for p in module.parameters())
            for ckpt in (False, True):
                terms = activation_bytes(shape_of(config, batch, text_tokens, torch.bfloat16, decision_dim), ckpt)
                gb = {"weights": 2 * weights, "decision_states": 16 * module_params, **terms}
                gb = {k: round(v / 1e9, 2) for k, v in gb.items()}
                total = round(sum(gb.values()), 1)
                saved = round(sum(v for k, v in gb.items() if k in terms and k not in NOT_SAVED), 1)
                rows.append(
                    {"config": label(decision_dim, ckpt), "decision_params_m": round(module_params / 1e6, 1)}
                    | {"terms_gb": gb, "saved_activations_gb": saved, "total_gb": total}
                    | {"fits_80gb": total < GPU_GB, "headroom_gb": round(GPU_GB - total, 1)}
                )
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=5, warmup=1)
    parser.add_argument("--batch", type=int, default=2, help="micro-batch (copies of the one sample)")
    parser.add_argument("--answer-tokens", type=int, default=8, help="the last text tokens, supervised")
    args = parser.parse_args()

    hidden = 4096 if args.full else args.hidden
    configs = [(d, ckpt) for d in (None, 512 * hidden // 4096) for ckpt in (False, True)]  # slim: D = C / 8
    if args.device.startswith("cuda"):  # peaks reset in-process: one model for all configurations
        model, config = build(args)
        rows = [measure(model, config, args, d, ckpt) for d, ckpt in configs]
    else:  # a fresh process per configuration, so that RSS peaks do not mix
        rows = []
        for d, ckpt in configs:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows.append(pool.submit(measure_fresh, args, d, ckpt).result())
    device = torch.device(args.device)
    peak = "CUDA allocated above the step's start" if device.type == "cuda" else "RSS increase"
    info = machine(device, args.dtype, hidden, batch=args.batch, peak=peak)
    estimate = estimate_7b()
    if args.json:
        print(json.dumps({"machine": info, "rows": rows, "estimate_7b_bf16_batch4": estimate}, indent=2))
        return
    print(info)
    for r in rows:
        print(
            f"{r['config']:<38} {r['samples_per_s']:>7.3f} samples/s  peak {r['peak_mb']:>8.1f} MB (estimate "
            f"{r['estimate_peak_mb']:.1f})  saved {r['saved_mb']:>8.2f} MB (estimate {r['estimate_saved_mb']:.2f}, "
            f"ratio {r['saved_over_estimate']:.4f})"
        )
    print(f"LLaVA-1.5-7B, micro-batch 4, bf16, estimate in GB against a {GPU_GB:.0f} GB GPU:")
    for r in estimate:
        t = r["terms_gb"]
        print(
            f"{r['config']:<38} weights {t['weights']} + decision states {t['decision_states']} "
            f"({r['decision_params_m']}M params) + saved activations {r['saved_activations_gb']} + live in backward "
            f"{round(r['total_gb'] - t['weights'] - t['decision_states'] - r['saved_activations_gb'], 1)} "
            f"= {r['total_gb']}  ({'fits' if r['fits_80gb'] else 'does not fit'}, headroom {r['headroom_gb']})"
        )


if __name__ == "__main__":
    main()
