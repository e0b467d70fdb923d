"""Gradient norms of the decision modules in training mode, with and without the cap on pruned keys' exponents.

Attaches fresh decision modules (layers 0, 1, 2) to a trained toy base model, runs training-mode forward passes on
batches of the toy world's conversations, and prints the gradient norm of the LM loss and of the (weighted) ratio
loss with respect to the decision modules, for each ``--caps`` value of ``lvpruning.attention.MAX_EXPONENT``
(0: the shipped cap at the best kept score; 20: nearly eq. 9's exact derivative). Results:
``benchmarks/TOY_WORLD.md``, fourth round.

    python benchmarks/decision_gradients.py --root /tmp/lvpruning-toy-curve --batches 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import lvpruning.attention as attention  # noqa: E402
from benchmarks.toy_learning_curve import batch_of, load_train  # noqa: E402
from lvpruning import PruningConfig, attach  # noqa: E402
from pipelines.toy.model import toy_processor  # noqa: E402
from pipelines.toy.writer import write_toy_world  # noqa: E402

BASE_MODEL = Path(__file__).resolve().parents[1] / "pipelines" / "toy" / "base_model"


def gradient_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    return float(torch.nn.utils.get_total_norm(torch.autograd.grad(loss, params, retain_graph=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/lvpruning-toy-curve", help="where the toy world is written")
    parser.add_argument("--n-train", type=int, default=24_000, help="training questions of the world")
    parser.add_argument("--base-model", default=str(BASE_MODEL))
    parser.add_argument("--caps", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="conversations per batch")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = LlavaForConditionalGeneration.from_pretrained(args.base_model)
    paths = write_toy_world(args.root, seed=0, n_train=args.n_train, n_test=800)
    data = load_train(paths, toy_processor(base.config))
    config = PruningConfig(layers=(0, 1, 2))
    w = config.lambda_ratio
    print(f"| MAX_EXPONENT | batch | keep fractions | LM loss | grad norm, LM loss | grad norm, {w} x ratio loss |")
    print("|---|---|---|---|---|---|")
    for cap in args.caps:
        attention.MAX_EXPONENT = cap
        torch.manual_seed(0)  # the same decision modules and Gumbel noise for every cap
        pruner = attach(base, config).train()
        params = list(pruner.decision_modules.parameters())
        for b in range(args.batches):
            rows = torch.arange(b * args.batch, (b + 1) * args.batch)
            out = pruner(**batch_of(data, rows))
            fractions = ", ".join(f"{f:.2f}" for f in out.keep_fractions.mean(0).tolist())
            lm = gradient_norm(out.lm_loss, params)
            ratio = gradient_norm(w * out.ratio_loss, params)
            print(f"| {cap:g} | {b} | {fractions} | {out.lm_loss.item():.3f} | {lm:.3g} | {ratio:.3g} |", flush=True)
        pruner.detach()


if __name__ == "__main__":
    main()
