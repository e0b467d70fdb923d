"""Batched generation throughput: LLaVA-1.5-7B-shaped model, no pruning vs LVPruning at rho = 0.5.

Random weights, per sample 1 image (576 vision tokens) + 30 text tokens, greedy decoding of exactly K new tokens
(EOS cannot stop a sample early, so every setting produces the same B*K tokens), at batch sizes 1, 4 and 16.
Settings: Hugging Face ``generate`` without pruning; ``pruner.generate`` at [0.5, 0.3, 0.1] with full-width
decision modules; the same with slim modules (decision_dim = hidden / 8: 64 at hidden 512, 512 at full width).
Reports the median wall time of one generate call over repeats (settings interleaved within each repeat, so that
drift hits all alike), tokens/s = B*K / time, and the speedup over no pruning at the same batch size.

    python benchmarks/generate.py --json                      # CPU, reduced width (hidden 512), fp32
    python benchmarks/generate.py --full --device cuda --dtype bfloat16 --json   # the real 7B shape on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.prefill import LAYERS, benchmark_parser, interleaved_ms, machine, reduced_7b_config  # noqa: E402
from lvpruning import PruningConfig, attach, paper_schedule  # noqa: E402
from lvpruning.flops import dummy_inputs  # noqa: E402
from lvpruning.presets import llava_15_7b_config  # noqa: E402

RHO = 0.5


def batch_inputs(config: LlavaConfig, batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype):
    """``batch`` copies of the dummy prompt (same length, so left padding is trivially satisfied), distinct images."""
    inputs = dummy_inputs(config, text_tokens, device)
    return {
        "input_ids": inputs["input_ids"].clamp_min(0).repeat(batch, 1),  # (B, N)
        "attention_mask": inputs["attention_mask"].repeat(batch, 1),  # (B, N)
        "pixel_values": torch.randn(batch, *inputs["pixel_values"].shape[1:], device=device, dtype=dtype),
    }


def settings(model: LlavaForConditionalGeneration, dtype: torch.dtype, k: int) -> dict[str, Callable]:
    """name -> generate(inputs) producing exactly ``k`` new tokens per sample."""
    text = model.config.text_config
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    ratios = paper_schedule(RHO)
    runs: dict[str, Callable] = {
        # min_new_tokens masks EOS's logit for the first k steps: Hugging Face cannot stop early
        "none": lambda x: model.generate(
            **x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=pad, use_cache=True
        ),
    }
    for label, dim in (("full modules", None), ("slim modules", text.hidden_size // 8)):
        pruner = attach(model, PruningConfig(layers=LAYERS, num_heads=8, decision_dim=dim)).to(dtype).eval()
        # eos_token_id=[]: no EOS ids (lvpruning.generation._eos_ids), so no sample finishes before k tokens
        runs[f"rho={RHO} {list(ratios)} {label}"] = lambda x, p=pruner: p.generate(
            x["input_ids"],
            x["pixel_values"],
            attention_mask=x["attention_mask"],
            keep_ratios=ratios,
            max_new_tokens=k,
            eos_token_id=[],
            pad_token_id=pad,
        )
    return runs


def measure(runs: dict[str, Callable], inputs: dict, k: int, args: argparse.Namespace, device: torch.device):
    """Median ms per setting; each repeat runs every setting once, in an order rotated from repeat to repeat."""
    expected = (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + k)
    for name, run in runs.items():
        out = run(inputs)
        assert tuple(out.shape) == expected, f"{name}: output {tuple(out.shape)}, expected (B, N + K) = {expected}"
    return interleaved_ms(
        {name: lambda r=run: r(inputs) for name, run in runs.items()}, args.repeats, args.warmup, device
    )


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=5, warmup=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=16, help="K, the new tokens per sample")
    args = parser.parse_args()

    device, dtype, k = torch.device(args.device), getattr(torch, args.dtype), args.new_tokens
    config = llava_15_7b_config() if args.full else reduced_7b_config(args.hidden)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    runs = settings(model, dtype, k)

    rows = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            ms = measure(runs, batch_inputs(config, batch, args.text_tokens, device, dtype), k, args, device)
            for name, t in ms.items():
                rows.append(
                    {
                        "batch": batch,
                        "setting": name,
                        "median_ms": round(t, 2),
                        "tokens_per_s": round(batch * k / t * 1e3, 2),
                        "speedup": round(ms["none"] / t, 3),
                    }
                )
    info = machine(device, args.dtype, config.text_config.hidden_size, new_tokens=k, text_tokens=args.text_tokens)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
    else:
        print(info)
        for row in rows:
            print(
                f"B={row['batch']:<3} {row['setting']:<38} {row['median_ms']:>10.1f} ms  "
                f"{row['tokens_per_s']:>9.1f} tok/s  speedup {row['speedup']:.2f}x"
            )


if __name__ == "__main__":
    main()
