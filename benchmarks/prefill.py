"""Prefill latency: a preset's shape (``--model``: LLaVA-1.5 / NeXT / OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) at
reduced width, no pruning vs the paper's rho = 0.6 / 0.5 / 0.45 schedules after layers 1, 8, 16, with full-width
decision modules (the paper's) and slim ones (``decision_dim`` = hidden / 8: 64 at hidden 512, 512 at full width),
and optionally FastV / random pruning after the same layers (``--baselines``).

Random weights, 1 image + 30 text tokens (LLaVA-1.5: 576 vision tokens; LLaVA-NeXT at ``--image-size`` 672 672:
5 tiles, 2,928 vision tokens; Qwen2.5-VL at 672 672: the processor's flattened 48 x 48 patches and
``image_grid_thw``, 576 vision tokens between ``<|vision_start|>`` and ``<|vision_end|>``), one forward pass with
logits for the last position only (what generation's prefill needs), all settings timed side by side in rotated
rounds. Reports the median over repeats and compares the measured speedup with the one the analytic FLOPs count
predicts (decision modules or the method's scoring, and the vision tower over every tile, included).

    python benchmarks/prefill.py --json                       # CPU, reduced width (hidden 512), fp32
    python benchmarks/prefill.py --model llava-next-7b --json # LLaVA-NeXT-7B's shape at 672 x 672, reduced width
    python benchmarks/prefill.py --model qwen2.5-vl-7b --hidden 896 --rhos 0.5 --baselines fastv random --json
    python benchmarks/prefill.py --full --device cuda --dtype bfloat16 --json   # the real 7B shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import Qwen2VLConfig

from lvpruning import PruningConfig, attach, paper_schedule
from lvpruning.flops import MODEL_CLASSES, analytic_flops, dummy_inputs, image_layout
from lvpruning.flops_qwen import is_qwen_vl
from lvpruning.policies import get_policy
from lvpruning.presets import PRESETS, AnyLlavaConfig, load_llava_config

RHOS = (0.6, 0.5, 0.45)
LAYERS = (1, 8, 16)
MODULES = ("full", "slim")  # decision modules of the paper's width, or of hidden / 8
BASELINES = ("fastv", "random")  # training-free methods timed at LAYERS with the same schedules (--baselines)


def reduced_7b_config(hidden: int, model: str = "llava-1.5-7b") -> AnyLlavaConfig:
    """The preset ``model``'s depth, token counts (tiles, vision tokens) and proportions at text width ``hidden``,
    its head size kept (128 in the 7B models) and its query / key-value head ratio; the vision tower scaled by the
    same factor (4 heads, :func:`reduced_tower`). LLaVA-1.5-7B: hidden 512 gives 4 heads, MLP 1376, a CLIP of width
    128, MLP 512; Qwen2.5-VL-7B: hidden 896 gives 7 heads (1 key/value head), MLP 4736, a ViT of width 320, MLP
    855, whose merger outputs 896."""
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
    vision = type(v)(**{**v.to_dict(), **reduced_tower(full, scale, hidden)})
    return type(full)(**{**full.to_dict(), "text_config": text.to_dict(), "vision_config": vision.to_dict()})


def reduced_tower(config: AnyLlavaConfig, scale: float, hidden: int) -> dict[str, int]:
    """The vision config's fields at ``scale`` times its width, 4 heads: CLIP / SigLIP a width of a multiple of 4;
    Qwen-VL's ViT a multiple of 16 (its 2-D rotary embedding splits each head in quarters), its merger's output
    the decoder's width ``hidden`` (Qwen2-VL: ``hidden_size``, ``mlp_ratio`` kept; the others ``out_hidden_size``)."""
    v = config.vision_config
    if not is_qwen_vl(config):
        width = {"hidden_size": 4 * round(v.hidden_size * scale / 4), "num_attention_heads": 4}
        return width | {"intermediate_size": round(v.intermediate_size * scale)}
    if isinstance(config, Qwen2VLConfig):
        return {"embed_dim": 16 * round(v.embed_dim * scale / 16), "num_heads": 4, "hidden_size": hidden}
    width = {"hidden_size": 16 * round(v.hidden_size * scale / 16), "num_heads": 4, "out_hidden_size": hidden}
    return width | {"intermediate_size": round(v.intermediate_size * scale)}


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
    """:func:`benchmark_parser` plus the model preset, the image's size and what is timed against no pruning."""
    parser = benchmark_parser(__doc__, repeats=7, warmup=2)
    parser.add_argument(
        "--model", default="llava-1.5-7b", choices=tuple(PRESETS), help="the preset whose shape is timed"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="the image's size in pixels, for LLaVA-NeXT / OneVision (default 672 672: NeXT's 5 tiles) and Qwen-VL "
        "(default 672 672: a 48 x 48 patch grid, 576 vision tokens; Qwen3-VL 441)",
    )
    parser.add_argument("--rhos", type=float, nargs="+", default=RHOS, help="schedules [rho, rho - 0.2, rho - 0.4]")
    parser.add_argument("--modules", nargs="+", default=MODULES, choices=MODULES, help="LVPruning's decision modules")
    parser.add_argument(
        "--baselines", nargs="*", default=(), choices=BASELINES, help="also timed after the same layers and schedules"
    )
    return parser


def prefill_config(args: argparse.Namespace) -> AnyLlavaConfig:
    """``args.model``'s preset at its full width (``--full``) or reduced to ``--hidden`` (:func:`reduced_7b_config`)."""
    return load_llava_config(args.model) if args.full else reduced_7b_config(args.hidden, args.model)


def build(config: AnyLlavaConfig, args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``config``'s HF model with random weights (SDPA) and the dummy prompt of ``args.text_tokens`` text tokens
    (Qwen-VL: as the processor gives it, the image's pads between ``<|vision_start|>`` and ``<|vision_end|>``, the
    flattened patches (h * w, D) and ``image_grid_thw`` [[1, h, w]])."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layout = image_layout(config, args.image_size)  # a size LLaVA-1.5 cannot take fails here, before the model is built
    if is_qwen_vl(config) and args.text_tokens < 2:
        raise ValueError("Qwen-VL's prompt needs --text-tokens of at least 2 (<|vision_start|>, <|vision_end|>)")
    torch.manual_seed(0)
    model = MODEL_CLASSES[type(config)]._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = dummy_inputs(config, args.text_tokens, device, args.image_size)
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"], dtype=dtype)
    inputs["input_ids"] = inputs["input_ids"].clamp_min(0)
    if is_qwen_vl(config):
        inputs["input_ids"][0, 0] = config.vision_start_token_id
        inputs["input_ids"][0, 1 + layout.num_vision_tokens] = config.vision_end_token_id
    return model, inputs


def hf_inputs(config: AnyLlavaConfig, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` as HF's own forward takes them: Qwen-VL's with the processor's ``mm_token_type_ids`` (1 at the
    image's pads), from which HF computes the M-RoPE positions."""
    if not is_qwen_vl(config):
        return inputs
    return inputs | {"mm_token_type_ids": (inputs["input_ids"] == config.image_token_id).int()}  # (1, N)


@dataclass
class Setting:
    """One timed prefill: its labels, the call, and the FLOPs the analytic count predicts for it."""

    schedule: str
    method: str
    modules: str
    run: Callable[[], object]
    flops: int


def settings(
    config: AnyLlavaConfig, model: torch.nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace
) -> list[Setting]:
    """No pruning, then per schedule ``args.rhos``: LVPruning with each of ``args.modules`` (decision modules of the
    paper's width or of hidden / 8, after ``LAYERS``) and each of ``args.baselines`` after the same layers (run
    through the first pruner, whose decision modules they do not use). Logits at the last position only."""
    dtype = getattr(torch, args.dtype)
    dims = {"full": None, "slim": config.text_config.hidden_size // 8}
    pruners = {
        label: attach(model, PruningConfig(layers=LAYERS, num_heads=8, decision_dim=dims[label])).to(dtype).eval()
        for label in args.modules
    }
    methods = [("lvpruning", label, pruner) for label, pruner in pruners.items()]
    methods += [(name, "-", next(iter(pruners.values()))) for name in args.baselines]
    count = {"num_text_tokens": args.text_tokens, "lm_head_positions": "last", "image_size": args.image_size}
    baseline = analytic_flops(config, methods[0][2].config, **count).baseline
    plain = hf_inputs(config, inputs)
    out = [Setting("none", "-", "-", lambda: model(**plain, logits_to_keep=1), baseline)]
    for rho in args.rhos:
        ratios = paper_schedule(rho)
        for method, label, pruner in methods:
            policy = get_policy(method, decision_modules=pruner.decision_modules)
            flops = analytic_flops(config, pruner.config, ratios, method=method, layers=LAYERS, **count).pruned
            run = partial(pruner, **inputs, keep_ratios=ratios, policy=policy, layers=LAYERS, logits_to_keep=1)
            out.append(Setting(f"rho={rho} {list(ratios)}", method, label, run, flops))
    return out


def measure(config: AnyLlavaConfig, args: argparse.Namespace) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Time every one of :func:`settings` side by side (:func:`interleaved_ms`): what it ran on and one row each,
    with the measured speedup, the FLOPs-predicted one and their ratio (``efficiency``)."""
    device = torch.device(args.device)
    model, inputs = build(config, args)
    timed = settings(config, model, inputs, args)
    with torch.inference_mode():
        ms = interleaved_ms({str(i): s.run for i, s in enumerate(timed)}, args.repeats, args.warmup, device)
    none = timed[0]
    rows = [
        {
            "schedule": s.schedule,
            "method": s.method,
            "modules": s.modules,
            "median_ms": round(ms[str(i)], 2),
            "speedup": round(ms["0"] / ms[str(i)], 3),
            "flops_speedup": round(none.flops / s.flops, 3),
            "efficiency": round(ms["0"] / ms[str(i)] / (none.flops / s.flops), 3),
            "tflops": round(s.flops / 1e12, 4),
            "flops": s.flops,
        }
        for i, s in enumerate(timed)
    ]
    parts = analytic_flops(config, PruningConfig(layers=LAYERS), None, args.text_tokens, image_size=args.image_size)
    vision = parts.baseline_parts["vision_patch_embed"] + parts.baseline_parts["vision_layers"]
    layout = image_layout(config, args.image_size)
    info = machine(
        device,
        args.dtype,
        config.text_config.hidden_size,
        model=args.model,
        image_size=list(layout.image_size),
        tiles=layout.num_tiles,
        vision_tokens=layout.num_vision_tokens,
        tower_share=round(vision / none.flops, 4),  # the vision tower's part of the unpruned FLOPs
    )
    return info, rows


def main() -> None:
    args = prefill_parser().parse_args()
    info, rows = measure(prefill_config(args), args)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
    else:
        print(info)
        for row in rows:
            print(
                f"{row['schedule']:<28} {row['method']:<9} {row['modules']:<5} {row['median_ms']:>9.1f} ms  "
                f"speedup {row['speedup']:.2f}x  FLOPs predict {row['flops_speedup']:.2f}x  ({row['efficiency']:.0%})"
            )


if __name__ == "__main__":
    main()
