"""Prefill latency: LLaVA-1.5-7B-shaped model, no pruning vs the paper's rho = 0.6 / 0.5 / 0.45 schedules, with
full-width decision modules (the paper's) and slim ones (``decision_dim`` = hidden / 8: 64 at hidden 512, 512 at
full width).

Random weights, 1 image (576 vision tokens) + 30 text tokens, one forward pass with logits for the last position
only (what generation's prefill needs), all settings timed side by side in rotated rounds. Reports the median over
repeats and compares the measured speedup with the one the analytic FLOPs count predicts (decision modules
included).

    python benchmarks/prefill.py --json                       # CPU, reduced width (hidden 512), fp32
    python benchmarks/prefill.py --full --device cuda --dtype bfloat16 --json   # the real 7B shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

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


def interleaved_ms(runs: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Median ms per run, measured side by side: each round runs every one once, in an order rotated from round to
    round, so that drift (clocks, other load) hits them alike; the first ``warmup`` rounds are left out."""
    names, times = list(runs), {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            ms = median_ms(runs[name], 1, 0, device)
            if i >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark_parser(doc: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """The options every benchmark here shares: the model's shape, device and dtype, repeats, JSON output."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the real 7B width (hidden 4096) instead of 512")
    parser.add_argument("--hidden", type=int, default=512, help="reduced width (a multiple of 128)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--text-tokens", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    return parser


def machine(device: torch.device, dtype: str, hidden: int, **extra: object) -> dict[str, object]:
    """What a result ran on: the device (GPU name, or the CPU model), torch threads and version, dtype, width."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype} | {
        "hidden": hidden,
        **extra,
    }


def main() -> None:
    args = benchmark_parser(__doc__, repeats=7, warmup=2).parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = llava_15_7b_config() if args.full else reduced_7b_config(args.hidden)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = dummy_inputs(config, args.text_tokens, device)
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"], dtype=dtype)
    inputs["input_ids"] = inputs["input_ids"].clamp_min(0)
    pruners = {
        label: attach(model, PruningConfig(layers=LAYERS, num_heads=8, decision_dim=dim)).to(dtype).eval()
        for label, dim in (("full", None), ("slim", config.text_config.hidden_size // 8))
    }

    runs: dict[str, Callable[[], object]] = {"none": lambda: model(**inputs, logits_to_keep=1)}
    for rho in RHOS:
        for label, pruner in pruners.items():
            ratios = paper_schedule(rho)
            runs[f"{rho} {label}"] = lambda r=ratios, p=pruner: p(**inputs, keep_ratios=r, logits_to_keep=1)
    with torch.inference_mode():
        ms = interleaved_ms(runs, args.repeats, args.warmup, device)
    count = analytic_flops(config, pruners["full"].config, None, args.text_tokens, lm_head_positions="last")
    rows = [{"schedule": "none", "modules": "-", "median_ms": round(ms["none"], 2), "speedup": 1.0}]
    rows[0] |= {"flops_speedup": 1.0, "tflops": round(count.baseline / 1e12, 4)}
    for rho in RHOS:
        ratios = paper_schedule(rho)
        for label, pruner in pruners.items():
            flops = analytic_flops(config, pruner.config, ratios, args.text_tokens, lm_head_positions="last")
            t = ms[f"{rho} {label}"]
            rows.append(
                {
                    "schedule": f"rho={rho} {list(ratios)}",
                    "modules": label,
                    "median_ms": round(t, 2),
                    "speedup": round(ms["none"] / t, 3),
                    "flops_speedup": round(flops.baseline / flops.pruned, 3),
                    "tflops": round(flops.pruned / 1e12, 4),
                }
            )
    for row in rows:
        row["efficiency"] = round(row["speedup"] / row["flops_speedup"], 3)
    info = machine(device, args.dtype, config.text_config.hidden_size)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
    else:
        print(info)
        for row in rows:
            print(
                f"{row['schedule']:<28} {row['modules']:<5} {row['median_ms']:>9.1f} ms  "
                f"speedup {row['speedup']:.2f}x  FLOPs predict {row['flops_speedup']:.2f}x  ({row['efficiency']:.0%})"
            )


if __name__ == "__main__":
    main()
