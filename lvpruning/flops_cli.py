"""The FLOPs CLI, ``python -m lvpruning.flops``: the analytic prefill count of a preset or HF config (LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL), beside FlopCounterMode's count on the ``meta`` device; a
table, or one JSON object with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lvpruning.config import PruningConfig, paper_schedule
from lvpruning.flops import (
    ANYRES_IMAGE_SIZE,
    TERA,
    TOLERANCE,
    FlopsReport,
    analytic_flops,
    image_layout,
    llm_flops,
    measure_flops,
    vision_and_projector_flops,
)
from lvpruning.lrs_vqa import KEEP_RATIOS, pyramid_bound, pyramid_flops
from lvpruning.policies import POLICIES, is_trained
from lvpruning.presets import AnyLlavaConfig, load_llava_config


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m lvpruning.flops``."""
    parser = argparse.ArgumentParser(
        prog="python -m lvpruning.flops",
        description="Prefill TFLOPs of LLaVA with and without LVPruning (1 image + T text tokens, paper "
        "sec. 4.1): analytic from the config, and measured by FlopCounterMode on the meta device.",
    )
    add = parser.add_argument
    add("--model", default="llava-1.5-7b", help="preset, HF model id or local path (config only)")
    add("--text-tokens", type=int, default=30, help="text tokens beside the image (paper: 30)")
    add(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help=f"image height and width in pixels, LLaVA-NeXT / OneVision / Qwen-VL (default {ANYRES_IMAGE_SIZE[0]} "
        f"{ANYRES_IMAGE_SIZE[1]}; Qwen-VL rounds both to multiples of 28, Qwen3-VL of 32, as their processors' "
        "smart_resize does); "
        "LLaVA-1.5 takes only its fixed 336 336",
    )
    add(
        "--method",
        choices=[*POLICIES, LRS_VQA],
        default="lvpruning",
        help="pruning method (default: LVPruning); lrs_vqa: LRS-VQA's pyramid on LLaVA-NeXT, its upper bound",
    )
    add("--layers", type=int, nargs="+", help="zero-based decoder layers (default: the method's published ones)")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument(
        "--ratios", type=float, nargs="+", help="keep ratio per stage (of |I_V|); lrs_vqa: share kept per round"
    )
    schedule.add_argument("--rho", type=float, help="paper schedule [rho, rho-0.2, rho-0.4] (default: published)")
    add("--module-layers", type=int, default=4, help="lrs_vqa: the Region Focus Module's decoder layers")
    add("--decision-blocks", type=int, default=2, help="cross-attention blocks per module")
    add("--decision-heads", type=int, default=8, help="heads per cross-attention block")
    add("--decision-ffn", type=int, default=None, help="decision FFN width (default twice the module's width)")
    add("--decision-dim", type=int, default=None, help="slim modules of this width (default: the hidden size)")
    add("--logits", choices=("all", "last"), default="all", help="lm_head positions counted")
    add("--no-measure", action="store_true", help="analytic count only")
    add("--json", action="store_true", help="print one JSON object")
    return parser


def format_report(name: str, report: FlopsReport, result: dict[str, Any]) -> str:
    """The table printed without ``--json``: the parts of both counts, the reduction, the measured counts."""
    vision = " -> ".join(str(k) for k in result["tokens_per_stage"]["vision"])
    height, width = report.image_size
    tiles = f"{report.num_tiles} tile{'s' if report.num_tiles > 1 else ''}"
    lines = [
        f"{name}: 1 image of {height} x {width} ({tiles}, {report.num_vision_tokens} vision tokens) + "
        f"{report.num_text_tokens} text tokens, prefill, matmuls only (2 FLOPs per multiply-add), logits at "
        f"{report.lm_head_positions} positions",
        f"{report.method} after layers {list(report.decision_layers)}, "
        f"keep ratios {list(report.keep_ratios)}: vision tokens {vision}",
        "",
        f"{'part':<22}{'baseline TFLOPs':>17}{'pruned TFLOPs':>15}",
    ]
    for part, value in report.pruned_parts.items():
        lines.append(f"{part:<22}{report.baseline_parts.get(part, 0) / TERA:>17.4f}{value / TERA:>15.4f}")
    lines += [
        f"{'total':<22}{report.baseline / TERA:>17.4f}{report.pruned / TERA:>15.4f}",
        f"reduction {report.reduction:.1%} (without the method's overhead "
        f"{report.reduction_without_decision:.1%}); unused vision layers {report.vision_unused / TERA:.4f}",
    ]
    for kind in ("baseline", "pruned"):
        if (measured := result[f"measured_{kind}_tflops"]) is not None:
            diff = result["agreement"][kind]
            lines.append(f"measured {kind} (FlopCounterMode, meta): {measured:.4f} ({diff:+.2%} vs analytic)")
    if "measured_pruned_error" in result:
        lines.append(f"measured pruned: failed ({result['measured_pruned_error']})")
    return "\n".join(lines)


LRS_VQA = "lrs_vqa"


def pyramid_report(args: argparse.Namespace, config: AnyLlavaConfig) -> dict[str, Any]:
    """``--method lrs_vqa``: LLaVA-NeXT's own anyres prefill of the image, the pyramid's finest level visited
    whole (nothing pruned), and the most LRS-VQA's pyramid can cost (:func:`lvpruning.lrs_vqa.pyramid_bound`),
    each with its tower passes, the LLM's prompt length and TFLOPs."""
    size = tuple(args.image_size or ANYRES_IMAGE_SIZE)
    layout = image_layout(config, size)
    text, layers = config.text_config, config.text_config.num_hidden_layers
    native = vision_and_projector_flops(config, layout)[0]
    native |= llm_flops(text, [layout.num_vision_tokens + args.text_tokens] * layers, args.logits)
    ratios = tuple(args.ratios or KEEP_RATIOS)
    bound = pyramid_bound(config, size, args.text_tokens, ratios)
    whole = pyramid_flops(config, args.module_layers, (bound.whole_length,), bound.whole_tiles, args.logits)
    pruned = pyramid_flops(config, args.module_layers, bound.rounds, bound.tiles, args.logits)
    rows = {
        "llava_next_anyres": (layout.num_tiles, layout.num_vision_tokens + args.text_tokens, native),
        "pyramid_level_whole": (bound.whole_tiles, bound.whole_length, whole),
        "lrs_vqa_upper_bound": (bound.tiles, bound.rounds[-1], pruned),
    }
    return {
        "method": LRS_VQA,
        "image_size": list(size),
        "num_text_tokens": args.text_tokens,
        "keep_ratios": list(ratios),
        "module_layers": args.module_layers,
        "rounds": list(bound.rounds),
        "rows": {
            name: {
                "tiles": t,
                "llm_tokens": n,
                "tflops": sum(p.values()) / TERA,
                "parts": {k: v / TERA for k, v in p.items()},
            }
            for name, (t, n, p) in rows.items()
        },
    }


def format_pyramid(name: str, result: dict[str, Any]) -> str:
    """The table printed for ``--method lrs_vqa`` without ``--json``."""
    height, width = result["image_size"]
    lines = [
        f"{name}: 1 image of {height} x {width} + {result['num_text_tokens']} text tokens, prefill, matmuls only; "
        f"LRS-VQA's pyramid with a {result['module_layers']}-layer Region Focus Module, shares kept "
        f"{result['keep_ratios']}: its upper bound (every tile of each level visited selected; the module's "
        f"rounds over {result['rounds'][:-1]} tokens)",
        "",
        f"{'':<22}{'tower passes':>14}{'LLM tokens':>12}{'TFLOPs':>10}{'tower':>9}{'module':>9}{'LLM':>9}",
    ]
    for row, r in result["rows"].items():
        parts = r["parts"]
        tower = parts["vision_patch_embed"] + parts["vision_layers"] + parts["projector"]
        module = parts.get("region_focus", 0.0)
        llm = r["tflops"] - tower - module
        lines.append(
            f"{row:<22}{r['tiles']:>14}{r['llm_tokens']:>12}{r['tflops']:>10.3f}{tower:>9.3f}{module:>9.3f}{llm:>9.3f}"
        )
    return "\n".join(lines)


def pruning_setting(
    args: argparse.Namespace, config: AnyLlavaConfig
) -> tuple[tuple[int, ...], tuple[float, ...], PruningConfig]:
    """The stages, keep ratios and pruning config the options ask for: the method's published ones unless given."""
    published = POLICIES[args.method].published.on(config.text_config.num_hidden_layers)
    layers = tuple(args.layers) if args.layers else published.layers
    if args.ratios:
        ratios = tuple(args.ratios)
    elif args.rho is not None:
        ratios = paper_schedule(args.rho, num_stages=len(layers))
    else:
        ratios = published.ratios if layers == published.layers else paper_schedule(0.5, len(layers))
    shape = {"num_blocks": args.decision_blocks, "num_heads": args.decision_heads}
    shape |= {"ffn_dim": args.decision_ffn, "decision_dim": args.decision_dim}
    if is_trained(args.method):
        pruning = PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, **shape)
    else:  # only the modules' shape is read; their stages are the method's decoder ones (a tower stage aside)
        stages = tuple(i for i in layers if i >= 0) or (0,)
        ones = (1.0,) * len(stages)
        pruning = PruningConfig(layers=stages, train_ratios=ones, infer_ratios=ones, **shape)
    return layers, ratios, pruning


def main(argv: Sequence[str] | None = None) -> int:
    """Print the counts; 1 when the measured and analytic counts differ by more than ``TOLERANCE`` or the pruned
    one failed to run, else 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.method == LRS_VQA:
        try:
            config = load_llava_config(args.model)
            result = pyramid_report(args, config)
        except ValueError as err:
            parser.error(str(err))
        print(json.dumps(result, indent=2) if args.json else format_pyramid(args.model, result))
        return 0
    try:
        config = load_llava_config(args.model)
        layers, ratios, pruning = pruning_setting(args, config)
        report = analytic_flops(
            config, pruning, ratios, args.text_tokens, args.logits, args.method, layers, image_size=args.image_size
        )
    except ValueError as err:
        parser.error(str(err))
    result = report.to_dict()
    measured: dict[str, int | None] = {"baseline": None, "pruned": None}
    if not args.no_measure:
        image_size = report.image_size
        measured["baseline"] = measure_flops(config, None, None, args.text_tokens, args.logits, image_size=image_size)
        try:
            measured["pruned"] = measure_flops(
                config,
                pruning,
                ratios,
                args.text_tokens,
                args.logits,
                method=args.method,
                layers=layers,
                image_size=image_size,
            )
        except (RuntimeError, NotImplementedError) as err:  # a data-dependent op the meta device cannot run
            result["measured_pruned_error"] = f"{type(err).__name__}: {err}"
    for kind, value in measured.items():
        result[f"measured_{kind}_tflops"] = None if value is None else value / TERA
    analytic = {"baseline": report.baseline, "pruned": report.pruned}
    # agreement: measured / analytic - 1 per count (None when not measured)
    result["agreement"] = {k: None if v is None else v / analytic[k] - 1 for k, v in measured.items()}
    result["agreement"]["tolerance"] = TOLERANCE
    print(json.dumps(result, indent=2) if args.json else format_report(args.model, report, result))
    off = [k for k in measured if (d := result["agreement"][k]) is not None and abs(d) > TOLERANCE]
    if off:
        print(f"warning: analytic and measured {off} differ by more than {TOLERANCE:.0%}", file=sys.stderr)
    return 1 if off or "measured_pruned_error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
