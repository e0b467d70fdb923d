"""Prefill latency: LLaVA-1.5-7B-shaped model, no pruning vs the paper's rho = 0.6 / 0.5 / 0.45 schedules.

Random weights, 1 image (576 vision tokens) + 30 text tokens, one forward pass with logits for the last position
only (what generation's prefill needs). Reports the median over repeats and compares the measured speedup with
the one the analytic FLOPs count predicts.

    python benchmarks/prefill.py --json                       # CPU, reduced width (hidden 512), fp32
    python benchmarks/prefill.py --full --device cuda --dtype bfloat16 --json   # the real 7B shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lvpruning import PruningConfig, attach, paper_schedule
from lvpruning.flops import analytic_flops, dummy_inputs
from lvpruning.presets import llava_15_7b_config

RHOS = (0.6, 0.5, 0.45)
LAYERS = (1, 8, 16)


def reduced_7b_config(hidden: int) -> LlavaConfig:
    """LLaVA-1.5-7B's depth, token counts and proportions at a smaller width (head size 128 as in 7B)."""
    full = llava_15_7b_config()
    text = LlamaConfig(
        **{
            **full.text_config.to_dict(),
            "hidden_size": hidden,
            "intermediate_size": int(hidden * 11008 / 4096),
            "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 128,
        }
    )
    vision = CLIPVisionConfig(
        **{
            **full.vision_config.to_dict(),
            "hidden_size": hidden // 4,
            "intermediate_size": hidden,
            "num_attention_heads": 4,
        }
    )
    return LlavaConfig(**{**full.to_dict(), "text_config": text.to_dict(), "vision_config": vision.to_dict()})


def median_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the real 7B width (hidden 4096) instead of 512")
    parser.add_argument("--hidden", type=int, default=512, help="reduced width (a multiple of 128)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = llava_15_7b_config() if args.full else reduced_7b_config(args.hidden)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = dummy_inputs(config, args.text_tokens, device)
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"], dtype=dtype)
    inputs["input_ids"] = inputs["input_ids"].clamp_min(0)
    pruner = attach(model, PruningConfig(layers=LAYERS, num_heads=8)).to(dtype).eval()

    rows = []
    with torch.inference_mode():
        base_ms = median_ms(lambda: model(**inputs, logits_to_keep=1), args.repeats, args.warmup, device)
        for rho in (None, *RHOS):
            ratios = (1.0, 1.0, 1.0) if rho is None else paper_schedule(rho)
            flops = analytic_flops(config, pruner.config, ratios, args.text_tokens, lm_head_positions="last")
            if rho is None:
                ms, name = base_ms, "none"
            else:
                run = lambda r=ratios: pruner(**inputs, keep_ratios=r, logits_to_keep=1)  # noqa: E731
                ms, name = median_ms(run, args.repeats, args.warmup, device), f"rho={rho} {list(ratios)}"
            rows.append(
                {
                    "schedule": name,
                    "median_ms": round(ms, 2),
                    "speedup": round(base_ms / ms, 3),
                    "flops_speedup": round(flops.baseline / (flops.pruned if rho else flops.baseline), 3),
                    "tflops": round((flops.pruned if rho else flops.baseline) / 1e12, 4),
                }
            )
    for row in rows:
        row["efficiency"] = round(row["speedup"] / row["flops_speedup"], 3)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "hidden": config.text_config.hidden_size,
    }
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
    else:
        print(machine)
        for row in rows:
            print(
                f"{row['schedule']:<28} {row['median_ms']:>9.1f} ms  speedup {row['speedup']:.2f}x  "
                f"FLOPs predict {row['flops_speedup']:.2f}x  ({row['efficiency']:.0%})"
            )


if __name__ == "__main__":
    main()
