"""The written toy world parses in the real formats, is deterministic, and is written once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipelines.toy.formats import PROMPT_SUFFIX, read_jsonl
from pipelines.toy.scenes import COLORS, QUADRANTS, SHAPES, SIZES, SceneSpec, make_split
from pipelines.toy.writer import write_toy_world

ANSWERS = {*COLORS, *SHAPES, *SIZES, "yes", "no"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=1, n_train=40, n_test=24)


def test_training_file_is_llava_instruction_json(world):
    records = json.loads(world.train_json.read_text())
    # one conversation per scene, a turn per question (a scene asks each type it can: 4 at most)
    assert isinstance(records, list) and 10 <= len(records) < 20
    assert len({r["id"] for r in records}) == len(records)
    assert sum(len(r["conversations"]) for r in records) == 2 * 40
    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        for human, gpt in zip(turns[0::2], turns[1::2]):
            assert human["value"].endswith(PROMPT_SUFFIX)
            assert gpt["value"].lower() in ANSWERS and gpt["value"] == gpt["value"].capitalize()
        image = Image.open(world.image_folder / r["image"])
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_test_files_are_llava_questions_and_ground_truth(world):
    questions = read_jsonl(world.test_questions)
    answers = read_jsonl(world.test_answers)
    assert len(questions) == len(answers) == 24
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert len({q["question_id"] for q in questions}) == 24
    for q, a in zip(questions, answers, strict=True):
        assert set(q) == {"question_id", "image", "text", "category"}
        assert set(a) == {"question_id", "answer", "category"}
        assert q["text"].endswith(PROMPT_SUFFIX) and "<image>" not in q["text"]
        assert q["category"] == a["category"] and a["answer"] in ANSWERS
        assert (world.image_folder / q["image"]).is_file()
    assert Counter(q["category"] for q in questions) == dict.fromkeys(SceneSpec().question_types, 6)


def test_yes_no_questions_are_also_written_as_pope(world):
    questions = {q["question_id"]: q for q in read_jsonl(world.test_questions)}
    answers = {a["question_id"]: a["answer"] for a in read_jsonl(world.test_answers)}
    pope_questions = read_jsonl(world.pope_questions)
    assert {q["category"] for q in pope_questions} <= set(world.pope_labels)
    labelled = []
    for category, path in world.pope_labels.items():
        assert path.name == f"coco_pope_{category}.json"  # the names LLaVA's eval_pope.py looks for
        labels = read_jsonl(path)
        # LLaVA's scorer pairs labels with answers by order within a category: same order as the questions
        assert [x["question_id"] for x in labels] == [
            q["question_id"] for q in pope_questions if q["category"] == category
        ]
        for x in labels:
            assert set(x) == {"question_id", "image", "text", "label"} and x["label"] in ("yes", "no")
            assert x["label"] == answers[x["question_id"]]
            assert questions[x["question_id"]]["category"] == "exist"
            assert questions[x["question_id"]]["text"] == x["text"] + PROMPT_SUFFIX
        labelled += labels
    assert len(labelled) == sum(q["category"] == "exist" for q in questions.values())
    assert Counter(x["label"] for x in labelled) == {"yes": 3, "no": 3}


def test_vocabulary_of_questions_is_closed(world):
    words = {
        "what",
        "color",
        "shape",
        "size",
        "is",
        "the",
        "object",
        "there",
        "a",
        "in",
        "image",
        "bigger",
        "than",
        "?",
    }
    words |= {*COLORS, *SHAPES} | {w for q in QUADRANTS for w in q.split()}
    for q in read_jsonl(world.test_questions):
        assert set(q["text"].removesuffix(PROMPT_SUFFIX).replace("?", " ?").lower().split()) <= words


def test_same_seed_writes_identical_files(world, tmp_path):
    other = write_toy_world(tmp_path / "again", seed=1, n_train=40, n_test=24)
    for name in ("train_json", "test_questions", "test_answers", "pope_questions"):
        assert getattr(world, name).read_bytes() == getattr(other, name).read_bytes()
    images = sorted(p.relative_to(world.image_folder) for p in world.image_folder.rglob("*.png"))
    assert images == sorted(p.relative_to(other.image_folder) for p in other.image_folder.rglob("*.png"))
    assert all((world.image_folder / p).read_bytes() == (other.image_folder / p).read_bytes() for p in images)


def test_test_images_are_not_training_images(world):
    train = {(world.image_folder / r["image"]).read_bytes() for r in json.loads(world.train_json.read_text())}
    test = {(world.image_folder / q["image"]).read_bytes() for q in read_jsonl(world.test_questions)}
    assert not train & test


def test_a_cached_world_is_reused_and_other_parameters_rewrite_it(tmp_path: Path):
    root = tmp_path / "world"
    paths = write_toy_world(root, seed=0, n_train=8, n_test=8)
    stamp = paths.manifest.stat().st_mtime_ns, paths.train_json.stat().st_mtime_ns
    assert write_toy_world(root, seed=0, n_train=8, n_test=8) == paths
    assert (paths.manifest.stat().st_mtime_ns, paths.train_json.stat().st_mtime_ns) == stamp

    write_toy_world(root, seed=0, n_train=12, n_test=8)
    assert len(json.loads(paths.train_json.read_text())) == len(make_split(0, 12, SceneSpec(), "train"))  # per scene
    assert json.loads(paths.manifest.read_text())["n_train"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_stale_world_is_rewritten_but_an_unmarked_folder_is_kept(tmp_path: Path):
    root = tmp_path / "world"
    paths = write_toy_world(root, seed=0, n_train=8, n_test=8)
    paths.manifest.unlink()  # without its manifest the folder is not known to be a toy world
    paths.train_json.write_text("[]")
    with pytest.raises(FileExistsError):  # no manifest, not empty: not ours to delete
        write_toy_world(root, seed=0, n_train=8, n_test=8)
    paths.manifest.write_text("{}")  # a manifest that matches nothing: ours, stale
    write_toy_world(root, seed=0, n_train=8, n_test=8)
    assert len(json.loads(paths.train_json.read_text())) == len(make_split(0, 8, SceneSpec(), "train"))


def test_refuses_to_overwrite_a_folder_that_is_not_a_world(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a toy world"):
        write_toy_world(tmp_path, seed=0, n_train=4, n_test=4)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
