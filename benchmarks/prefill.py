"""Prefill latency: a LLaVA-1.5-7B- or LLaVA-NeXT-7B-shaped model (``--model``), no pruning vs the paper's
rho = 0.6 / 0.5 / 0.45 schedules, with full-width decision modules (the paper's) and slim ones (``decision_dim`` =
hidden / 8: 64 at hidden 512, 512 at full width).

Random weights, 1 image + 30 text tokens (LLaVA-1.5: 576 vision tokens; LLaVA-NeXT at ``--image-size`` 672 672:
5 tiles, 2,928 vision tokens), one forward pass with logits for the last position only (what generation's prefill
needs), all settings timed side by side in rotated rounds. Reports the median over repeats and compares the
measured speedup with the one the analytic FLOPs count predicts (decision modules and the vision tower over every
tile included).

    python benchmarks/prefill.py --json                       # CPU, reduced width (hidden 512), fp32
    python benchmarks/prefill.py --model llava-next-7b --json # LLaVA-NeXT-7B's shape at 672 x 672, reduced width
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

from lvpruning import PruningConfig, attach, paper_schedule
from lvpruning.flops import MODEL_CLASSES, analytic_flops, dummy_inputs, image_layout
from lvpruning.flops_qwen import is_qwen_vl
from lvpruning.presets import PRESETS, AnyLlavaConfig, load_llava_config

RHOS = (0.6, 0.5, 0.45)
LAYERS = (1, 8, 16)
# --model: any LLaVA preset; a reduced width keeps its shape (see reduced_7b_config, which scales CLIP / SigLIP
# towers: the Qwen-VL presets are not ported to this benchmark)
MODELS = tuple(name for name in PRESETS if not is_qwen_vl(load_llava_config(name)))


def reduced_7b_config(hidden: int, model: str = "llava-1.5-7b") -> AnyLlavaConfig:
    """The preset ``model``'s depth, token counts (tiles, vision tokens) and proportions at text width ``hidden``,
    its head size kept (128 in the 7B models) and its query / key-value head ratio; the vision tower scaled by the
    same factor (4 heads). LLaVA-1.5-7B: hidden 512 gives 4 heads, MLP 1376, a CLIP of width 128, MLP 512."""
    full = load_llava_config(model)
    t, v = full.text_config, full.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    heads, group = hidden // head_dim, t.num_attention_heads // t.num_key_value_heads
    if hidden % head_dim or heads % group:
        raise ValueError(
            f"--hidden {hidden} must be a multiple of {head_dim * group} for {model} (head size {head_dim}, "
            f"{group} query heads per key/value head)"
        )
    scale = hidden / t.hidden_size
    text = type(t)(
        **{
            **t.to_dict(),
            "hidden_size": hidden,
            "intermediate_size": int(hidden * t.intermediate_size / t.hidden_size),
            "num_attention_heads": heads,
            "num_key_value_heads": heads // group,
            "head_dim": head_dim,
        }
    )
    vision = type(v)(
        **{
            **v.to_dict(),
            "hidden_size": 4 * round(v.hidden_size * scale / 4),
            "intermediate_size": round(v.intermediate_size * scale),
            "num_attention_heads": 4,
        }
    )
    return type(full)(**{**full.to_dict(), "text_config": text.to_dict(), "vision_config": vision.to_dict()})


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
    parser.add_argument(
        "--hidden",
        type=int,
        default=512,
        help="reduced width (a multiple of 128; with grouped-query attention, of 128 x query heads per key/value head)",
    )
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


def prefill_parser() -> argparse.ArgumentParser:
    """:func:`benchmark_parser` plus the model preset and, for LLaVA-NeXT / OneVision, the image's size."""
    parser = benchmark_parser(__doc__, repeats=7, warmup=2)
    parser.add_argument("--model", default="llava-1.5-7b", choices=MODELS, help="the preset whose shape is timed")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="LLaVA-NeXT / OneVision only: the image's size in pixels (default 672 672: NeXT's 5 tiles)",
    )
    return parser


def build(args: argparse.Namespace) -> tuple[AnyLlavaConfig, torch.nn.Module, dict[str, torch.Tensor]]:
    """The config (full or reduced width), its HF model with random weights (SDPA) and the dummy prompt."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = load_llava_config(args.model) if args.full else reduced_7b_config(args.hidden, args.model)
    image_layout(config, args.image_size)  # a size LLaVA-1.5 cannot take fails here, before the model is built
    torch.manual_seed(0)
    model = MODEL_CLASSES[type(config)]._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = dummy_inputs(config, args.text_tokens, device, args.image_size)
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"], dtype=dtype)
    inputs["input_ids"] = inputs["input_ids"].clamp_min(0)
    return config, model, inputs


def main() -> None:
    args = prefill_parser().parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, model, inputs = build(args)
    layout = image_layout(config, args.image_size)
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
    count = analytic_flops(
        config, pruners["full"].config, None, args.text_tokens, lm_head_positions="last", image_size=args.image_size
    )
    rows = [{"schedule": "none", "modules": "-", "median_ms": round(ms["none"], 2), "speedup": 1.0}]
    rows[0] |= {"flops_speedup": 1.0, "tflops": round(count.baseline / 1e12, 4)}
    for rho in RHOS:
        ratios = paper_schedule(rho)
        for label, pruner in pruners.items():
            flops = analytic_flops(
                config, pruner.config, ratios, args.text_tokens, lm_head_positions="last", image_size=args.image_size
            )
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
    vision = count.baseline_parts["vision_patch_embed"] + count.baseline_parts["vision_layers"]
    info = machine(
        device,
        args.dtype,
        config.text_config.hidden_size,
        model=args.model,
        image_size=list(layout.image_size),
        tiles=layout.num_tiles,
        vision_tokens=layout.num_vision_tokens,
        tower_share=round(vision / count.baseline, 4),  # the vision tower's part of the unpruned FLOPs
    )
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
