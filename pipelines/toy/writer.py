"""Write the toy world to disk in the real formats, once: a manifest marks a finished world and its inputs.

Layout under ``root``::

    manifest.json                  parameters + relative paths (written last: its presence means "complete")
    images/{train,test}/NNNNNN.png the image folder; records name images relative to it
    train.json                     LLaVA instruction JSON
    test/questions.jsonl           LLaVA evaluation questions, category = question type
    test/ground_truth.jsonl        question_id, answer, category
    test/pope/llava_pope_test.jsonl + coco_pope_{random,adversarial}.json   the yes/no questions as POPE

``spec`` chooses the world: ``SceneSpec`` (the default) or ``hires.HiresSpec``, the high-resolution world for
LLaVA-NeXT (images of 64 x 128 to 128 x 128 pixels, in the same files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from pipelines.toy.formats import (
    answer_record,
    conversation_record,
    pope_label_record,
    question_record,
    write_jsonl,
)
from pipelines.toy.hires import HiresSpec
from pipelines.toy.scenes import POPE_CATEGORIES, Scene, SceneSpec, WorldSpec, make_split

FORMAT_VERSION = 4
MANIFEST = "manifest.json"
# data.toy_variant: the 64 x 64 world, the high-resolution one (hires.HiresSpec), the 64 x 64 one of a toy Qwen2.5-VL,
# the large-image one (256 x 256 images in 4 x 4 tiles, 1-3 objects: LARGE), the high-resolution one of a toy
# Qwen2.5-VL in its three aspects (QWEN_HIRES: images of three sizes, read at their own)
VARIANTS = ("default", "hires", "qwen", "large", "qwen_hires")
LARGE = {"aspects": ("large",), "max_objects": 3}  # the large-image world's HiresSpec
QWEN_HIRES = {"aspects": ("square", "wide", "tall")}  # the toy Qwen2.5-VL's high-resolution world
HIRES_VARIANTS = {"hires": {}, "large": LARGE, "qwen_hires": QWEN_HIRES}  # their HiresSpec's fields


def world_spec(variant: str = "default", question_types: tuple[str, ...] | None = None) -> WorldSpec:
    """The scenes of the toy world ``variant`` (``VARIANTS``), asking ``question_types`` (None: the variant's own);
    unknown names fail here, named."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown toy world variant {variant!r}; choose from {list(VARIANTS)}")
    spec = HiresSpec if variant in HIRES_VARIANTS else SceneSpec
    own = HIRES_VARIANTS.get(variant, {})
    return spec(**own) if question_types is None else spec(question_types=question_types, **own)


@dataclass(frozen=True)
class ToyWorldPaths:
    """Where each file of a written toy world is."""

    root: Path
    manifest: Path
    image_folder: Path
    train_json: Path
    test_questions: Path
    test_answers: Path
    pope_questions: Path
    pope_labels: dict[str, Path]

    @classmethod
    def under(cls, root: Path) -> ToyWorldPaths:
        pope = root / "test" / "pope"
        return cls(
            root=root,
            manifest=root / MANIFEST,
            image_folder=root / "images",
            train_json=root / "train.json",
            test_questions=root / "test" / "questions.jsonl",
            test_answers=root / "test" / "ground_truth.jsonl",
            pope_questions=pope / "llava_pope_test.jsonl",
            pope_labels={c: pope / f"coco_pope_{c}.json" for c in POPE_CATEGORIES},
        )


def scene_parameters(spec: WorldSpec) -> dict:
    """What a model trained on the world depends on: its format and how scenes and questions are drawn (not the
    seed or the split sizes), as JSON values."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **asdict(spec)}))


def _parameters(seed: int, n_train: int, n_test: int, spec: WorldSpec) -> dict:
    return {"seed": seed, "n_train": n_train, "n_test": n_test, **scene_parameters(spec)}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _matches(found: dict | None, wanted: dict) -> bool:
    return found is not None and {k: found.get(k) for k in wanted} == json.loads(json.dumps(wanted))


def _save_image(scene: Scene, spec: WorldSpec, folder: Path, name: str) -> None:
    Image.fromarray(spec.render(scene)).save(folder / name, optimize=False)


def _write(root: Path, seed: int, n_train: int, n_test: int, spec: WorldSpec) -> None:
    paths = ToyWorldPaths.under(root)
    for folder in (paths.image_folder / "train", paths.image_folder / "test", paths.pope_questions.parent):
        folder.mkdir(parents=True)

    train = make_split(seed, n_train, spec, "train")
    records = []
    for i, (scene, questions) in enumerate(train):
        image = f"train/{i:06d}.png"
        _save_image(scene, spec, paths.image_folder, image)
        # Turns in a random order per scene, so a question's type is read from it, not from its turn number.
        turns = random.Random(f"toy-world/{seed}/turns/{i}").sample(questions, len(questions))
        records.append(conversation_record(f"toy-{i:06d}", image, turns))
    paths.train_json.write_text(json.dumps(records))

    test = make_split(seed, n_test, spec, "test", exclude={scene.key() for scene, _ in train})
    questions, answers, pope_questions = [], [], []
    pope_labels: dict[str, list[dict]] = {c: [] for c in POPE_CATEGORIES}
    for i, (scene, scene_questions) in enumerate(test):
        image = f"test/{i:06d}.png"
        _save_image(scene, spec, paths.image_folder, image)
        for q in scene_questions:
            qid = len(questions)
            questions.append(question_record(qid, image, q))
            answers.append(answer_record(qid, q))
            if q.pope_category is not None:
                pope_questions.append(question_record(qid, image, q, category=q.pope_category))
                pope_labels[q.pope_category].append(pope_label_record(qid, image, q))
    write_jsonl(paths.test_questions, questions)
    write_jsonl(paths.test_answers, answers)
    write_jsonl(paths.pope_questions, pope_questions)
    for category, labels in pope_labels.items():
        write_jsonl(paths.pope_labels[category], labels)

    manifest = {
        **_parameters(seed, n_train, n_test, spec),
        "n_train_images": len(train),
        "n_test_images": len(test),
        "files": {k: str(v.relative_to(root)) for k, v in asdict(paths).items() if isinstance(v, Path)},
    }
    paths.manifest.write_text(json.dumps(manifest, indent=2))


def write_toy_world(
    root: str | Path, seed: int = 0, n_train: int = 20_000, n_test: int = 2_000, spec: WorldSpec | None = None
) -> ToyWorldPaths:
    """Write (or reuse) the toy world with ``n_train`` training and ``n_test`` test questions under ``root``
    (``spec=HiresSpec()``: the high-resolution world).

    A world whose manifest has the same parameters is reused as is. Otherwise the world is built in a
    temporary sibling folder and moved into place, so a crash never leaves a half-written world that looks
    finished. An existing ``root`` that is not a toy world (no manifest, not empty) is never deleted.
    """
    spec = spec or SceneSpec()
    root = Path(root)
    paths = ToyWorldPaths.under(root)
    wanted = _parameters(seed, n_train, n_test, spec)
    found = _read_manifest(root)
    if _matches(found, wanted):
        return paths
    if root.exists() and found is None and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a toy world (no {MANIFEST}); refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the world is meant to be shared like any data folder
    try:
        _write(staging, seed, n_train, n_test, spec)
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(staging, root)
        except OSError:  # another process finished the same world first: use it if it matches
            if not _matches(_read_manifest(root), wanted):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return paths
