"""Learning curve of the toy LLaVA trained from scratch on the toy world (plain PyTorch, CPU, no Ray).

Trains every parameter (vision tower, projector, Llama: the project's ``base`` stage) with AdamW on the written
LLaVA instruction JSON, supervising only the answer tokens (prompt tokens are -100), and measures exact-match
accuracy per question type on the test split: the argmax of the next token after "ASSISTANT:" (the answer is
one word = one token, so this is greedy decoding's first step). Results: ``benchmarks/TOY_WORLD.md``.

    python benchmarks/toy_learning_curve.py --steps 1500 --out /tmp/toy_curve.json
    python benchmarks/toy_learning_curve.py --turns 1 --model num_layers=6 --spec max_objects=4
    python benchmarks/toy_learning_curve.py --order-seed 1   # same world and weights, another training order
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.conversation import IMAGE_PLACEHOLDER, count_image_tokens, render, supervised_mask  # noqa: E402
from pipelines.toy.formats import read_jsonl  # noqa: E402
from pipelines.toy.model import VISION_POSITION_STD, build_toy_model, toy_config, toy_processor  # noqa: E402
from pipelines.toy.scenes import SceneSpec  # noqa: E402
from pipelines.toy.writer import write_toy_world  # noqa: E402

IGNORE_INDEX = -100
Conversation = tuple[str, list[tuple[str, str]], str]  # (image, [(human, gpt), ...], category)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, lists), else kept as text."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def encode(processor, image_folder: Path, samples: list[Conversation]) -> dict:
    """Tokenise conversations; each image goes through the processor's image processor once.

    Returns ``input_ids`` / ``labels`` (N, T) right-padded, ``prompt_len`` (N,) (the first answer's position),
    ``image_index`` (N,), ``pixel_values`` (I, 3, H, W) and ``category`` (N,).
    """
    tokenizer = processor.tokenizer
    images = sorted({image for image, *_ in samples})
    pixels = []
    for start in range(0, len(images), 512):
        chunk = [Image.open(image_folder / name).convert("RGB") for name in images[start : start + 512]]
        pixels.append(processor.image_processor(chunk, return_tensors="pt")["pixel_values"])
    index = {name: i for i, name in enumerate(images)}

    # The processor expands <image> into one token per vision token; do it once here for all samples alike, and
    # supervise the answers exactly as the training job does (render: the vicuna_v1 template and answer spans).
    n_image_tokens = count_image_tokens(processor)
    shift = (n_image_tokens - 1) * len(IMAGE_PLACEHOLDER)  # every answer comes after the image
    rows, masks = [], []
    for _, turns, _ in samples:
        prompt = render(turns)
        text = prompt.text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * n_image_tokens)
        encoded = tokenizer(text, return_offsets_mapping=True)
        spans = [(start + shift, end + shift) for start, end in prompt.answer_spans]
        rows.append(encoded["input_ids"])
        masks.append(supervised_mask(np.asarray(encoded["offset_mapping"]), spans).tolist())
    image, turns, _ = samples[0]  # the text-only encoding above must match the processor's
    reference = processor(images=[Image.open(image_folder / image)], text=[render(turns).text])
    assert reference["input_ids"][0] == rows[0], "text-only tokenisation differs from the processor's"
    assert tokenizer.unk_token_id not in {t for row in rows for t in row}, "a word is missing from the vocab"

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (row, supervised) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.where(torch.tensor(supervised), torch.tensor(row), IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,  # the answer words and their </s>, as LLaVA supervises
        "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
        "prompt_len": torch.tensor([m.index(True) for m in masks]),
        "image_index": torch.tensor([index[image] for image, *_ in samples]),
        "pixel_values": torch.cat(pixels),
        "category": [category for *_, category in samples],
    }


def load_train(paths, processor, turns: int = 0) -> dict:
    """The written training JSON, encoded. ``turns > 0`` cuts each conversation into conversations of at most
    ``turns`` questions (``1``: one question per sequence); ``0`` keeps them as written."""
    train: list[Conversation] = []
    for r in json.loads(paths.train_json.read_text()):
        pairs = [(h["value"], g["value"]) for h, g in zip(r["conversations"][::2], r["conversations"][1::2])]
        pairs = [(human.replace("<image>\n", ""), answer) for human, answer in pairs]
        size = turns or len(pairs)
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            train.append((r["image"], [(f"<image>\n{chunk[0][0]}", chunk[0][1]), *chunk[1:]], "train"))
    return encode(processor, paths.image_folder, train)


def load_test(paths, processor) -> dict:
    """The written test questions with their ground truth, encoded as single-turn conversations."""
    answers = {r["question_id"]: r for r in read_jsonl(paths.test_answers)}
    test = [
        (q["image"], [(f"<image>\n{q['text']}", answers[q["question_id"]]["answer"])], q["category"])
        for q in read_jsonl(paths.test_questions)
    ]
    return encode(processor, paths.image_folder, test)


def batch_of(data: dict, rows: torch.Tensor) -> dict:
    width = int(data["attention_mask"][rows].sum(1).max())  # trim the padding this batch does not need
    return {
        "input_ids": data["input_ids"][rows, :width],
        "attention_mask": data["attention_mask"][rows, :width],
        "labels": data["labels"][rows, :width],
        "pixel_values": data["pixel_values"][data["image_index"][rows]],
    }


@torch.no_grad()
def evaluate(model, data: dict, batch_size: int = 256) -> dict[str, float]:
    """Exact-match accuracy per category: argmax of the token after "ASSISTANT:" vs the answer token."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(data["input_ids"]), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data["input_ids"])))
        batch = batch_of(data, rows)
        batch.pop("labels")
        logits = model(**batch).logits  # (B, T, V)
        last = data["prompt_len"][rows] - 1  # position of ":" in "ASSISTANT:"
        predicted = logits[torch.arange(len(rows)), last].argmax(-1)  # (B,)
        target = data["input_ids"][rows, last + 1]  # (B,)
        for i, row in enumerate(rows.tolist()):
            hits[data["category"][row]].append(bool(predicted[i] == target[i]))
    model.train()
    accuracy = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


def setup(args: argparse.Namespace):
    """The toy world (written once), its encoded splits, the model and its optimizer + schedule."""
    spec_overrides = parse_overrides(args.spec)
    spec = SceneSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_overrides.items()})
    config = toy_config(spec, **parse_overrides(args.model))
    if args.tie:  # the input embedding of a word is the direction that outputs it
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    processor = toy_processor(config)
    paths = write_toy_world(args.root, seed=args.seed, n_train=args.n_train, n_test=args.n_test, spec=spec)
    test_data = load_test(paths, processor)
    if args.from_pretrained:  # e.g. the shipped base model: evaluate it (--steps 0) or train it further
        model = LlavaForConditionalGeneration.from_pretrained(args.from_pretrained).train()
    else:
        model = build_toy_model(config, seed=args.seed, vision_position_std=args.vision_position_std or None).train()
    train_data = load_train(paths, processor, args.turns) if args.steps else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"spec {dataclasses.asdict(spec)}")
    print(f"model {n_params / 1e6:.2f}M params, {n_params * 4 / 2**20:.1f} MiB fp32", flush=True)
    if train_data is not None:
        n_answers = int((train_data["labels"] != IGNORE_INDEX).sum()) // 2
        print(
            f"{len(train_data['input_ids'])} train conversations ({n_answers} answers, up to "
            f"{train_data['input_ids'].shape[1]} tokens); {len(test_data['input_ids'])} test questions",
            flush=True,
        )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, args.beta2),
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    return processor, train_data, test_data, model, optimizer, scheduler


def train(args: argparse.Namespace) -> list[dict]:
    """Train for ``args.steps`` steps, evaluating every ``args.eval_every``; returns the learning curve."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor, train_data, test_data, model, optimizer, scheduler = setup(args)
    if not args.steps:
        accuracy = evaluate(model, test_data)
        print(" ".join(f"{k}={v:.3f}" for k, v in accuracy.items()), flush=True)
        return [{"step": 0, **accuracy}]
    generator = torch.Generator().manual_seed(args.seed + args.order_seed)
    order = torch.randperm(len(train_data["input_ids"]), generator=generator)
    cursor, losses, curve, train_time, cpu_time = 0, [], [], 0.0, 0.0
    for step in range(1, args.steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        if cursor + args.batch > len(order):  # a new epoch, reshuffled
            order, cursor = torch.randperm(len(order), generator=generator), 0
        rows = order[cursor : cursor + args.batch]
        cursor += args.batch
        loss = model(**batch_of(train_data, rows)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
        train_time += time.perf_counter() - wall
        cpu_time += time.process_time() - cpu
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = evaluate(model, test_data)
            point = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "train_s": round(train_time, 1),
                "cpu_s": round(cpu_time, 1),  # contention-free measure: CPU seconds of this process
                **accuracy,
            }
            curve.append(point)
            losses = []
            print(
                " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()), flush=True
            )
            if args.target and accuracy["mean"] >= args.target:
                break
    if args.save_model:
        model.save_pretrained(args.save_model)
        processor.save_pretrained(args.save_model)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/lvpruning-toy-curve", help="where the toy world is written")
    parser.add_argument("--seed", type=int, default=0, help="the world's and the initial weights' seed")
    parser.add_argument("--order-seed", type=int, default=0, help="added to --seed for the training order only")
    parser.add_argument("--n-train", type=int, default=20_000, help="training questions")
    parser.add_argument("--n-test", type=int, default=2_000, help="test questions")
    parser.add_argument("--spec", nargs="*", default=[], help="SceneSpec overrides, key=value")
    parser.add_argument("--model", nargs="*", default=[], help="TOY_MODEL overrides, key=value")
    parser.add_argument(
        "--vision-position-std",
        type=float,
        default=VISION_POSITION_STD,
        help="std of the CLIP position embeddings at init (0: CLIP's own, 0.02)",
    )
    parser.add_argument("--tie", action="store_true", help="tie the Llama's input and output embeddings")
    parser.add_argument("--turns", type=int, default=0, help="questions per training conversation (0: as written)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="conversations per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--beta2", type=float, default=0.98, help="AdamW's second-moment decay")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.0, help="stop once mean accuracy reaches this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from-pretrained", default="", help="start from this saved toy model, not from scratch")
    parser.add_argument("--save-model", default="", help="save the trained model + processor here")
    parser.add_argument("--out", default="", help="write the curve as JSON here")
    args = parser.parse_args()
    curve = train(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
