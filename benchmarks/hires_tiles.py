"""Do the tiles matter? The toy LLaVA-NeXT on the high-resolution toy world's test questions, given every vision
token, the base view alone, or the tiles alone.

"Alone" is the same model and prompt with the other view's tokens removed before the first decoder layer (the
engine's vision-tower stage, a policy that keeps one ``VisionLayout`` kind), every kept token at its original
position, as LLaVA-NeXT would see the image if its processor had sent only that view. The base view alone is
64 of 336 tokens per image; the tiles alone keep their 256 tokens and the 16 newlines. Accuracy per question type
(the toy scorer's categories). Results: ``benchmarks/TOY_WORLD.md``, "The toy LLaVA-NeXT".

    python benchmarks/hires_tiles.py --world toy_hires/world --questions 800
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaNextConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lvpruning import PruningConfig, attach, from_pretrained  # noqa: E402
from lvpruning.layout import BASE, NEWLINE, TILE, packed_cells  # noqa: E402
from lvpruning.policies.base import PruningPolicy, Schedule  # noqa: E402
from lvpruning.stage import StageInput  # noqa: E402
from pipelines.eval.inference import Preprocessor, question_text, read_questions  # noqa: E402
from pipelines.eval.models import Setting, timed_generate  # noqa: E402
from pipelines.eval.scoring import TOY_BENCHMARK, score  # noqa: E402
from pipelines.toy.base import SHIPPED_BASE_MODELS  # noqa: E402
from pipelines.toy.writer import ToyWorldPaths  # noqa: E402

VIEWS = {"base view alone": (BASE,), "tiles alone": (TILE, NEWLINE)}


class ViewOnly(PruningPolicy):
    """Keeps the vision tokens of the layout ``kinds`` (at the vision-tower stage: nothing else is read)."""

    name = "view-only"
    published = Schedule((-1,), (1.0,))
    tower_stage = True
    tower_tiles = True

    def __init__(self, kinds: tuple[int, ...]):
        self.kinds = torch.tensor(kinds)

    def scores(self, stage: StageInput) -> torch.Tensor:
        return torch.isin(stage.kept_layout().kind, self.kinds.to(stage.vision_pos.device)).float()


def view_ratio(config: LlavaNextConfig, image_sizes: Sequence[Sequence[int]], kinds: tuple[int, ...]) -> float:
    """The keep ratio that keeps exactly the tokens of ``kinds`` (k = floor(ratio * n)); every image of the batch
    must have the same layout (the default world's images are all 128 x 128)."""
    cells = [packed_cells(config, [int(x) for x in size]) for size in image_sizes]  # (n, 4) each
    if any(not torch.equal(c, cells[0]) for c in cells):
        raise ValueError("the batch's images have different layouts: use a world of one aspect")
    kind = cells[0][:, 0]
    return (torch.isin(kind, torch.tensor(kinds)).sum().item() + 0.5) / len(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_BASE_MODELS["hires"]), help="a trained toy LLaVA-NeXT")
    parser.add_argument("--world", default="toy_hires/world", help="the high-resolution toy world's directory")
    parser.add_argument("--questions", type=int, default=800, help="test questions, from the first")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)

    world = ToyWorldPaths.under(Path(args.world))
    questions = read_questions(str(world.test_questions))[: args.questions]
    base = from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    preprocess = Preprocessor(processor, str(world.image_folder))
    requests = [preprocess.request(question_text(TOY_BENCHMARK, q), q["image"]) for q in questions]
    pruned = attach(base, PruningConfig(layers=(0,), train_ratios=(1.0,), infer_ratios=(1.0,))).eval()  # stages unused

    print(f"{len(questions)} questions of {args.world}, {args.model}")
    header = None
    for view, kinds in {"every token": None, **VIEWS}.items():
        answers = []
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start : start + args.batch_size]
            images = {key: [r[key] for r in batch] for key in ("pixel_values", "image_sizes")}
            prompts = [r["input_ids"] for r in batch]
            if kinds is None:
                texts, _, _ = timed_generate(base, processor.tokenizer, prompts, images, Setting("none"), None, 8)
            else:
                setting = Setting("random", (view_ratio(base.config, images["image_sizes"], kinds),), layers=(-1,))
                texts, _, _ = timed_generate(pruned, processor.tokenizer, prompts, images, setting, ViewOnly(kinds), 8)
            answers += [{"question_id": q["question_id"], "text": t} for q, t in zip(questions[start:], texts)]
        result = score(TOY_BENCHMARK, questions, answers, str(world.test_answers))
        categories = result["breakdown"]["category"]  # percent
        if header is None:
            header = list(categories)
            print("| view | " + " | ".join(header) + " | mean |")
            print("|---" * (len(header) + 2) + "|")
        cells = " | ".join(f"{categories[c]:.2f}" for c in header)
        print(f"| {view} | {cells} | {result['score']:.2f} |")


if __name__ == "__main__":
    main()
