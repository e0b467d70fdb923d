"""Where in the image each training-free method's first stage keeps its tokens, on inputs with no positional
structure: tiny random LLaVA models (5 layers, an 8 x 8 grid), random images and random prompts. Prints the mean
raster index of the kept vision tokens as a fraction of the grid (0.5: no bias; 0.246: the top half exactly).

TransPrune's first stage is also computed with a literal transcription of the official scoring (liaolea/TransPrune,
``modeling_llama_transprune.py``: ``compute_transf_weight`` and the IGA block of ``transprune_rank_drop``, at batch
size 1, on HF's eager pass of the same weights), by its terms, to say whether a bias is ours or the method's.

    python benchmarks/positional_bias.py            # the first stage after decoder layer 0
    python benchmarks/positional_bias.py --layer 1
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from lvpruning import PruningConfig, attach
from lvpruning.policies import get_policy
from lvpruning.policies.star import StarPolicy
from lvpruning.policies.transprune import TransPrunePolicy, normalized
from lvpruning.stage import StageInput, gather_tokens
from lvpruning.tiny import tiny_llava, tiny_llava_config

IMAGE_TOKEN, VOCAB, GRID = 4, 128, 8
NUM_VISION = GRID * GRID


class CausalStar(StarPolicy):
    """STAR's visual self-attention under a causal mask (what its first stage computed in decoder layer 1)."""

    def scores(self, stage: StageInput) -> torch.Tensor:
        if stage.layer != -1:
            return super().scores(stage)
        h = gather_tokens(stage.hidden_in, stage.vision_pos).float()
        logits = h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
        return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=1)


class TransPruneTerm(TransPrunePolicy):
    """TransPrune ranked by one of its two terms, ``ttv`` or ``iga``."""

    def __init__(self, term: str):
        self.term = term

    def scores(self, stage: StageInput) -> torch.Tensor:
        ttv = normalized(sum(stage.recorded(layer) for layer in stage.records) * stage.vision_valid())
        return ttv if self.term == "ttv" else super().scores(stage) - ttv


def make_batch(num: int, seed: int) -> dict[str, torch.Tensor]:
    """``num`` samples ``[BOS, 3 tokens, <image> x 64, 6 tokens]`` of random tokens and random pixels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, VOCAB, (num, 9), generator=g)
    image = torch.full((num, NUM_VISION), IMAGE_TOKEN)
    input_ids = torch.cat([torch.ones(num, 1, dtype=torch.long), text[:, :3], image, text[:, 3:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(num, 3, 32, 32, generator=g),
    }


def transf_weight(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's ``compute_transf_weight`` on one sample's (N, C): ``||y|| / ||x|| * exp(1 - cos) / sum``,
    the sum over the whole sequence."""
    necessity = torch.exp(1 - F.cosine_similarity(x, y, dim=-1))
    return y.norm(dim=-1) / x.norm(dim=-1) * necessity / necessity.sum()


def reference_terms(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """The official TransPrune scores of one sample's vision tokens at a first stage after ``layer``, and its terms:
    ``score`` = TTV / sum + IGA / sum, ``ttv`` (attention + FFN sub-blocks), ``ttv attention``, ``ttv ffn``,
    ``iga`` (the next layer's attention from the text after the image, mean over heads and those tokens)."""
    seen, hooks = {}, []
    block = model.model.language_model.layers[layer]
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):

        def keep(module, args, out, name=name):
            seen[name] = (out[0] if isinstance(out, tuple) else out)[0].double()

        hooks.append(getattr(block, name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids[None], pixel_values=pixel_values, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    vision = (input_ids == IMAGE_TOKEN).nonzero()[:, 0]
    start, end = int(vision[0]), int(vision[-1]) + 1
    attention = transf_weight(seen["input_layernorm"], seen["self_attn"])[start:end]
    ffn = transf_weight(seen["post_attention_layernorm"], seen["mlp"])[start:end]
    iga = out.attentions[layer + 1][0].double()[:, end:, start:end].mean(dim=0).mean(dim=0)
    ttv = attention + ffn
    score = ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)
    return {"score": score, "ttv": ttv, "ttv attention": attention, "ttv ffn": ffn, "iga": iga}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=0, help="the decoder layer after which the first stage prunes")
    parser.add_argument("--ratio", type=float, default=0.5, help="its keep ratio")
    parser.add_argument("--seeds", type=int, default=4, help="tiny models, 8 samples each")
    args = parser.parse_args()
    k = math.floor(args.ratio * NUM_VISION)
    decoder = {
        "random": lambda seed: get_policy("random", seed=seed),
        "fastv": lambda seed: get_policy("fastv"),
        "adaptinfer": lambda seed: get_policy("adaptinfer"),
        "transprune": lambda seed: get_policy("transprune"),
        "transprune, TTV only": lambda seed: TransPruneTerm("ttv"),
        "transprune, IGA only": lambda seed: TransPruneTerm("iga"),
    }
    tower = {"star (tower)": lambda seed: StarPolicy(), "star, causal (the mutation)": lambda seed: CausalStar()}
    means: dict[str, list[float]] = {}
    agree = total = 0
    for seed in range(args.seeds):
        config = PruningConfig(layers=(0, 1, 2), train_ratios=(0.5, 0.3, 0.1), infer_ratios=(0.5, 0.3, 0.1))
        pruner = attach(tiny_llava(tiny_llava_config(num_layers=5, vocab_size=VOCAB), seed=seed), config).eval()
        eager = tiny_llava(tiny_llava_config(num_layers=5, vocab_size=VOCAB), seed=seed, attn_implementation="eager")
        batch = make_batch(8, seed)
        for name, policy in (*decoder.items(), *tower.items()):
            layers = (-1,) if name in tower else (args.layer,)
            with torch.no_grad():
                kept = pruner(**batch, policy=policy(seed), layers=layers, keep_ratios=(args.ratio,)).kept_vision[0]
            means.setdefault(name, []).extend((kept.float().mean(dim=1) / (NUM_VISION - 1)).tolist())
            if name == "transprune":
                ours = kept
        for b in range(8):
            terms = reference_terms(eager, batch["input_ids"][b], batch["pixel_values"][b : b + 1], args.layer)
            for term, scores in terms.items():
                reference = scores.topk(k).indices.sort().values
                means.setdefault(f"official transprune: {term}", []).append(reference.float().mean().item() / 63)
            agree += torch.equal(terms["score"].topk(k).indices.sort().values, ours[b])
            total += 1
    print(f"first stage after decoder layer {args.layer} (STAR: the tower), keep {args.ratio} of {NUM_VISION}")
    for name, values in means.items():
        print(f"  {name:40s} mean raster index {sum(values) / len(values):.3f}")
    print(f"  our transprune keeps the official formula's set in {agree} of {total} samples")


if __name__ == "__main__":
    main()
