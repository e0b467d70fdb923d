"""The high-resolution toy world: deterministic, answers readable off the full-resolution pixels and not off the
base view that LLaVA-NeXT's image processor makes."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from lvpruning.tiny import build_tokenizer
from pipelines.toy.formats import PROMPT_SUFFIX, read_jsonl
from pipelines.toy.hires import (
    ASPECTS,
    GREY,
    HiresSpec,
    base_view,
    image_grid_pinpoints,
    tiles,
    vision_tokens,
)
from pipelines.toy.scenes import COLORS, SHAPES, Question, Scene, make_split, repaint, toy_words
from pipelines.toy.writer import write_toy_world

SPEC = HiresSpec(aspects=tuple(ASPECTS))
SIZES = {"square": (128, 128), "wide": (64, 128), "tall": (128, 64), "large": (256, 256)}  # (height, width)


@pytest.fixture(scope="module")
def split():
    return make_split(seed=2, n_questions=1_000, spec=SPEC, split="train")


@pytest.fixture(scope="module")
def processor() -> LlavaNextProcessor:
    """LLaVA-NeXT's processor (PIL backend, its default bicubic resize) for the world, without rescaling or
    normalising: ``pixel_values[i][0]`` is the base view, the rest the tiles, as uint8."""
    size = {"height": SPEC.tile, "width": SPEC.tile}
    image_processor = LlavaNextImageProcessorPil(
        size=size, crop_size=size, image_grid_pinpoints=image_grid_pinpoints(SPEC), do_rescale=False, do_normalize=False
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(toy_words(SPEC.question_types)),
        patch_size=SPEC.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def views(processor: LlavaNextProcessor, image: np.ndarray) -> np.ndarray:
    """``(1 + tiles, 64, 64, 3)`` int: the base view, then the tiles, as the processor cuts them."""
    pixels = processor.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
    return pixels.transpose(0, 2, 3, 1).astype(int)


def read_objects(image: np.ndarray) -> list[dict]:
    """The objects of an image read off its pixels alone: each box (a non-black rectangle), its color (the direction
    of the strongest pixel's offset from GREY) and its shape (where the checkerboard is at least half strength)."""
    free = image.any(-1)  # (H, W): box pixels not yet read
    found = []
    while free.any():
        y0, x0 = map(int, np.argwhere(free)[0])  # top-left corner of the next box in raster order
        y1, x1 = y0, x0
        while y1 < image.shape[0] and free[y1, x0]:
            y1 += 1
        while x1 < image.shape[1] and free[y0, x1]:
            x1 += 1
        box = image[y0:y1, x0:x1].astype(int)  # (h, w, 3)
        assert free[y0:y1, x0:x1].all() and not free[y0:y1, x1 : x1 + 1].any() and not free[y1 : y1 + 1, x0:x1].any()
        free[y0:y1, x0:x1] = False
        # (h, w, 3): each pixel's offset from GREY, its checkerboard sign undone (even pixels carry the color)
        y, x = np.mgrid[y0:y1, x0:x1]
        offset = (box - GREY) * np.where((y + x) % 2 == 0, 1, -1)[..., None]
        strongest = offset.reshape(-1, 3)[np.argmax(np.abs(offset).sum(-1))]  # (3,)
        cosine = {
            name: strongest @ (np.array(c) - GREY) / np.linalg.norm(strongest) / np.linalg.norm(np.array(c) - GREY)
            for name, c in COLORS.items()
        }
        color = max(cosine, key=cosine.get)
        assert cosine[color] > 0.99 and sorted(cosine.values())[-2] < 0.9, cosine
        channel = int(np.argmax(np.abs(np.array(COLORS[color]) - GREY)))
        ink = np.abs(box[..., channel] - GREY) >= abs(COLORS[color][channel] - GREY) / 2  # (h, w)
        rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
        ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if ink.all():
            shape = "square"
        elif not ink[ink.shape[0] // 2, ink.shape[1] // 2]:
            shape = "ring"
        elif ink[0].sum() < ink[-1].sum():
            shape = "triangle"
        else:
            shape = "cross"
        found.append({"shape": shape, "color": color, "y": (y0, y1), "x": (x0, x1)})
    return found


def answer_from_pixels(image: np.ndarray, question: Question) -> str:
    """The answer to ``question`` from ``read_objects`` and the image's size alone."""
    objects = read_objects(image)
    named = [next((o for o in objects if o[k] == v), None) for k, v in question.named]  # the objects it names
    if question.category == "exist":
        return "yes" if named[0] is not None else "no"
    if question.category == "relation":
        (a0, a1), (b0, b1) = (o[question.axis] for o in named)
        assert a1 <= b0 or b1 <= a0  # apart along the axis
        return "yes" if a1 <= b0 else "no"
    (obj,) = named
    if question.category == "where":
        start, end = obj[question.axis]
        half = image.shape[1 if question.axis == "x" else 0] // 2
        assert half in (SPEC.tile, 2 * SPEC.tile) and (end <= half or start >= half)  # the object in one half
        return {"x": ("left", "right"), "y": ("top", "bottom")}[question.axis][start >= half]
    return obj[question.category]


def test_same_seed_same_world_other_seed_or_split_differs(split):
    again = make_split(seed=2, n_questions=1_000, spec=SPEC, split="train")
    assert again == split
    assert all(np.array_equal(SPEC.render(a), SPEC.render(b)) for (a, _), (b, _) in zip(again, split, strict=True))
    assert make_split(seed=3, n_questions=1_000, spec=SPEC, split="train") != split
    assert make_split(seed=2, n_questions=1_000, spec=SPEC, split="test") != split


def test_question_counts_and_yes_no_balance(split):
    questions = [q for _, qs in split for q in qs]
    assert Counter(q.category for q in questions) == dict.fromkeys(SPEC.question_types, 200)
    answers = Counter((q.category, q.answer) for q in questions)
    for category in ("exist", "relation"):
        assert answers[category, "yes"] == answers[category, "no"] == 100
    assert {a for c, a in answers if c == "where"} == {"left", "right", "top", "bottom"}
    assert all(len(q.answer.split()) == 1 for q in questions)


def test_non_square_sizes_come_from_the_seed_and_objects_stay_in_one_tile(split):
    sizes = Counter(scene.size for scene, _ in split)
    assert set(sizes) == set(SIZES.values()) and min(sizes.values()) > len(split) / 5
    assert {s.size for s, _ in make_split(0, 200, HiresSpec(), "train")} == {SIZES["square"]}
    for scene, _ in split[:100]:
        image = SPEC.render(scene)
        assert image.shape == (*scene.size, 3)
        for obj in read_objects(image):
            (y0, y1), (x0, x1) = obj["y"], obj["x"]
            assert y0 // SPEC.tile == (y1 - 1) // SPEC.tile and x0 // SPEC.tile == (x1 - 1) // SPEC.tile


def test_every_answer_is_read_off_the_full_resolution_pixels(split):
    for scene, questions in split:
        image = SPEC.render(scene)
        assert {(o["shape"], o["color"]) for o in read_objects(image)} == {(o.shape, o.color) for o in scene.objects}
        for q in questions:
            assert answer_from_pixels(image, q) == q.answer, q.text


def test_base_view_is_the_processors_and_tiles_are_the_image(split, processor):
    for scene, _ in split[:30]:
        image = SPEC.render(scene)
        seen = views(processor, image)
        assert np.array_equal(seen[0], base_view(image, SPEC))
        cut = tiles(image, SPEC)
        assert len(seen) == 1 + len(cut) and all(np.array_equal(s, t) for s, t in zip(seen[1:], cut, strict=True))


def test_base_view_cannot_tell_color_or_shape_but_the_tile_can(split, processor):
    # Two scenes that differ in one object's color (or shape) give base views within PIL's rounding of each
    # other, and tiles that differ by the object's full contrast; the object itself shows in the base view.
    rng = random.Random(0)
    worst_base, weakest_tile, changes = 0, 255, Counter()
    for scene, _ in split[:120]:
        target = rng.choice(scene.objects)
        unused_colors = [c for c in COLORS if c not in {o.color for o in scene.objects}]
        unused_shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
        original = views(processor, SPEC.render(scene))
        variants = {"color": repaint(scene, target, color=rng.choice(unused_colors))}
        if unused_shapes:
            variants["shape"] = repaint(scene, target, shape=rng.choice(unused_shapes))
        for kind, variant in variants.items():
            changed = np.abs(views(processor, SPEC.render(variant)) - original).max(axis=(1, 2, 3))  # per view
            worst_base = max(worst_base, changed[0])
            weakest_tile = min(weakest_tile, changed[1:].max())
            assert (changed[1:] > 0).sum() == 1  # only the object's own tile
            changes[kind] += 1
        gone = Scene(tuple(o for o in scene.objects if o != target), scene.size)
        assert np.abs(views(processor, SPEC.render(gone))[0] - original[0]).max() >= 100  # where it is: visible
    assert changes["color"] == 120 and changes["shape"] > 40
    assert worst_base <= 1  # out of 255: PIL's rounding (33 at a halved axis without SOFTEN)
    assert weakest_tile >= 40


def test_a_flat_color_would_survive_the_base_view():
    # The control: the same box filled with the plain color (no checkerboard) is readable at base-view scale.
    flat = {}
    for color in ("red", "blue"):
        image = np.zeros((*SIZES["square"], 3), np.uint8)
        image[20:32, 20:32] = COLORS[color]
        flat[color] = base_view(image, SPEC).astype(int)
    assert np.abs(flat["red"] - flat["blue"]).max() > 100


def test_vision_tokens_differ_by_aspect(processor):
    counts = {}
    for aspect, (height, width) in SIZES.items():
        image = np.zeros((height, width, 3), np.uint8)
        ids = processor(images=[image], text=["<image>\nIs there a ring in the image?"], return_tensors="np")
        counts[aspect] = int((ids["input_ids"] == processor.image_token_id).sum())
        assert counts[aspect] == vision_tokens(SPEC, height, width)
    assert counts == {"square": 64 + 4 * 64 + 16, "wide": 64 + 2 * 64 + 8, "tall": 64 + 2 * 64 + 16} | {
        "large": 64 + 16 * 64 + 32
    }


def test_question_words_are_in_the_vocabulary(split):
    words = set(toy_words(SPEC.question_types))
    assert toy_words(SPEC.question_types)[: len(toy_words())] == toy_words()  # new words last: old ids kept
    for _, questions in split:
        for q in questions:
            assert set(q.text.replace("?", " ").lower().split()) | {q.answer} <= words


def test_hires_world_is_written_in_the_same_formats(tmp_path):
    spec = HiresSpec(aspects=tuple(ASPECTS))
    world = write_toy_world(tmp_path / "world", seed=1, n_train=50, n_test=40, spec=spec)
    manifest = json.loads(world.manifest.read_text())
    assert manifest["aspects"] == list(ASPECTS) and manifest["tile"] == 64
    records = json.loads(world.train_json.read_text())
    assert sum(len(r["conversations"]) for r in records) == 2 * 50
    sizes = {Image.open(world.image_folder / r["image"]).size for r in records}  # (width, height)
    assert sizes == {(w, h) for h, w in SIZES.values()}
    questions, answers = read_jsonl(world.test_questions), read_jsonl(world.test_answers)
    assert Counter(q["category"] for q in questions) == dict.fromkeys(spec.question_types, 8)
    assert all(q["text"].endswith(PROMPT_SUFFIX) for q in questions)
    pope = read_jsonl(world.pope_labels["random"])
    assert Counter(x["label"] for x in pope) == {"yes": 4, "no": 4}
    assert [a["category"] for a in answers] == [q["category"] for q in questions]

    again = write_toy_world(tmp_path / "again", seed=1, n_train=50, n_test=40, spec=spec)
    for name in ("train_json", "test_questions", "test_answers", "pope_questions"):
        assert getattr(world, name).read_bytes() == getattr(again, name).read_bytes()
    images = sorted(p.relative_to(world.image_folder) for p in world.image_folder.rglob("*.png"))
    assert all((world.image_folder / p).read_bytes() == (again.image_folder / p).read_bytes() for p in images)
    low_res = write_toy_world(tmp_path / "world", seed=1, n_train=50, n_test=40)  # another world: rewritten
    assert "aspects" not in json.loads(low_res.manifest.read_text())


def test_bad_spec_fails_with_its_key():
    with pytest.raises(ValueError, match="aspects"):
        HiresSpec(aspects=("panorama",))
    with pytest.raises(ValueError, match="large_px"):
        HiresSpec(large_px=40)  # 5 patches: more than a 32-pixel slot
    with pytest.raises(ValueError, match="max_objects"):
        HiresSpec(max_objects=5)
    with pytest.raises(ValueError, match="question_types"):
        HiresSpec(question_types=("colour",))
