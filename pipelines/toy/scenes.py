"""Synthetic scenes and questions of the toy world, deterministic from a seed.

A scene is a ``grid x grid`` board of patches (``patch`` pixels each, one patch = one vision token) split
into 2 x 2 quadrants. Each object sits in its own quadrant, aligned to the patch grid, and covers 1 patch
(small) or 2 x 2 patches (large), so the answer to a question lives in a few of the ``grid**2`` vision tokens.
Shapes and colors are unique within a scene: "the ring" or "the red object" names exactly one object.

Question types (the ``category`` of the benchmark files):

- ``color``: "What color is the ring?" -> an attribute of the object the question names by shape;
- ``shape``: "What shape is the red object?" -> an attribute of the object named by color;
- ``exist``: "Is there a ring in the image?" / "Is there a red object in the image?" -> yes / no, balanced;
  like POPE, a question names one thing, and the negatives name a shape or color absent from the scene
  (POPE's ``random`` split: the toy world has no co-occurrence statistics for ``popular``/``adversarial``);
- ``compare``: "Is the ring bigger than the cross?" -> yes / no, balanced: a relation between two named
  objects (yes when the first is large and the second small), as GQA's ``compare`` questions;
- ``position``: "What shape is in the top left?" -> the shape of the object in a named quadrant;
- ``size``: "What size is the ring?" -> small / large;
- ``relation``: "Is the ring left of the cross?" / "Is the ring above the cross?" -> yes / no, balanced: where two
  named objects lie relative to each other, asked only along an axis on which they do not overlap;
- ``where``: "Is the ring on the left or the right?" / "Is the ring at the top or the bottom?" -> the half of the
  image the named object is in (in the high-resolution world, ``pipelines/toy/hires.py``, the tile column or row).

The default world asks ``color``, ``shape``, ``exist`` and ``compare``. ``position`` (a named grid cell) stays
available but is not in it: the toy model, trained from scratch, never learnt it in any budget tried here
(``benchmarks/TOY_WORLD.md``, seventh and eighth rounds).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
SHAPES = ("square", "ring", "cross", "triangle")
SIZES = ("small", "large")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("color", "shape", "exist", "compare", "position", "size", "relation", "where")
POPE_CATEGORIES = ("random",)
_TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "exist": "Is there a {shape} in the image?",
    "exist_color": "Is there a {color} object in the image?",
    "compare": "Is the {} bigger than the {}?",
    "position": "What shape is in the {quadrant}?",
    "size": "What size is the {shape}?",
}
# Questions asked along an axis (x: left/right, y: top/bottom); their words come last in ``toy_words``.
_AXIS_TEMPLATES = {
    "relation": {"x": "Is the {} left of the {}?", "y": "Is the {} above the {}?"},
    "where": {"x": "Is the {} on the left or the right?", "y": "Is the {} at the top or the bottom?"},
}
_HALVES = {"x": ("left", "right"), "y": ("top", "bottom")}
# For each attribute question: the attribute that names the object, and the one asked for.
_ASKS = {
    "color": ("shape", "color"),
    "shape": ("color", "shape"),
    "position": ("quadrant", "shape"),
    "size": ("shape", "size"),
}


def check_objects(min_objects: int, max_objects: int, most: int) -> None:
    """A scene spec's object counts: ``1 <= min_objects <= max_objects <= most``."""
    if not 1 <= min_objects <= max_objects <= most:
        raise ValueError(
            f"min_objects, max_objects must satisfy 1 <= min <= max <= {most}, got {min_objects}, {max_objects}"
        )


def check_question_types(question_types: tuple[str, ...]) -> None:
    """A scene spec's question types: a non-empty subset of ``QUESTION_TYPES``."""
    unknown = set(question_types) - set(QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {unknown}")


@dataclass(frozen=True)
class SceneSpec:
    """How scenes and questions are drawn. ``grid**2`` is the number of vision tokens of the toy model."""

    grid: int = 8
    patch: int = 8
    min_objects: int = 1  # scenes of one object teach reading the image before finding in it
    max_objects: int = 3
    question_types: tuple[str, ...] = ("color", "shape", "exist", "compare")
    large_fraction: float = 0.5
    small_px: int = 8  # side of a small object's box in pixels (the shape keeps a 1-pixel margin inside)
    large_px: int = 16

    def __post_init__(self) -> None:
        if self.grid % 2 or self.grid < 4:
            raise ValueError(f"grid must be even and >= 4, got {self.grid}")
        check_objects(self.min_objects, self.max_objects, len(QUADRANTS))
        if not 5 <= self.small_px < self.large_px <= self.grid // 2 * self.patch:
            raise ValueError(
                f"small_px, large_px must satisfy 5 <= small < large <= quadrant side, got "
                f"{self.small_px}, {self.large_px}"
            )
        check_question_types(self.question_types)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    def side(self, size: str) -> int:
        return self.small_px if size == "small" else self.large_px

    def cells(self, size: str) -> int:
        """Patches per side that an object of ``size`` covers."""
        return -(-self.side(size) // self.patch)

    def sample(self, rng: random.Random) -> Scene:
        return sample_scene(rng, self)

    def render(self, scene: Scene) -> np.ndarray:
        return render(scene, self)


@dataclass(frozen=True)
class ToyObject:
    """One object: its top-left patch ``(row, col)``, the ``cells`` x ``cells`` patches it covers, its box side
    ``side`` in pixels (drawn centred in those patches); ``quadrant`` names the part of the image it is in (in the
    high-res world, its tile)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    quadrant: str
    cells: int
    side: int

    def patches(self, grid: int) -> set[int]:
        """Indices (row-major) of the vision tokens this object covers."""
        return {(self.row + r) * grid + self.col + c for r in range(self.cells) for c in range(self.cells)}


@dataclass(frozen=True)
class Scene:
    """The objects of a scene; ``size`` is its ``(height, width)`` in pixels where the world's images vary in size
    (None: the spec's square image)."""

    objects: tuple[ToyObject, ...]
    size: tuple[int, int] | None = None

    def key(self) -> tuple:
        return self.size, tuple(sorted((o.shape, o.color, o.size, o.row, o.col) for o in self.objects))

    def by(self, **attrs: str) -> ToyObject | None:
        """The object whose attributes match ``attrs`` (shapes and colors are unique), or None."""
        found = [o for o in self.objects if all(getattr(o, k) == v for k, v in attrs.items())]
        return found[0] if found else None


class WorldSpec(Protocol):
    """How a world samples and renders its scenes: ``SceneSpec`` here, ``hires.HiresSpec`` for the high-res world."""

    question_types: tuple[str, ...]

    def sample(self, rng: random.Random) -> Scene: ...

    def render(self, scene: Scene) -> np.ndarray: ...


@dataclass(frozen=True)
class Question:
    """A question about a scene: its type, what it names (e.g. ``(("shape", "ring"),)``; a ``compare`` or
    ``relation`` question names two shapes, in order), its answer, and the axis of a ``relation`` or ``where``
    question (``"x"`` or ``"y"``)."""

    category: str
    named: tuple[tuple[str, str], ...]
    answer: str
    pope_category: str | None = None
    axis: str | None = None

    @property
    def text(self) -> str:
        if self.axis is not None:
            return _AXIS_TEMPLATES[self.category][self.axis].format(*(value for _, value in self.named))
        if self.category == "compare":
            return _TEMPLATES["compare"].format(*(value for _, value in self.named))
        named = dict(self.named)
        template = "exist_color" if self.category == "exist" and "color" in named else self.category
        return _TEMPLATES[template].format(**named)

    def targets(self, scene: Scene) -> tuple[ToyObject, ...]:
        """The objects the question names: their patches hold everything needed to answer it."""
        return tuple(o for o in scene.objects if any(getattr(o, k) == v for k, v in self.named))


def sample_scene(rng: random.Random, spec: SceneSpec) -> Scene:
    """Distinct shapes, colors and quadrants; positions aligned to the patch grid inside each quadrant."""
    half = spec.grid // 2
    n_objects = rng.randint(spec.min_objects, spec.max_objects)
    shapes = rng.sample(SHAPES, n_objects)
    colors = rng.sample(list(COLORS), n_objects)
    quadrants = rng.sample(range(len(QUADRANTS)), n_objects)
    objects = []
    for shape, color, q in zip(shapes, colors, quadrants, strict=True):
        size = "large" if rng.random() < spec.large_fraction else "small"
        cells = spec.cells(size)
        row = (q // 2) * half + rng.randint(0, half - cells)  # the object stays inside its quadrant
        col = (q % 2) * half + rng.randint(0, half - cells)
        objects.append(ToyObject(shape, color, size, row, col, QUADRANTS[q], cells, spec.side(size)))
    return Scene(tuple(objects))


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` mask of a shape drawn in a box of ``side`` pixels with a 1-pixel margin.

    The four shapes differ in many pixels at every size (a filled box, its outline, a plus, a triangle), and
    each quarter of a large one still tells them apart: a vision tower trained from scratch reads them quickly.
    """
    c = (side - 1) / 2
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    r = side / 2 - 1  # keeps a background margin so that neighbouring objects never touch
    stroke = max(1, round(side / 8))
    box = (np.abs(x - c) <= r - 0.5) & (np.abs(y - c) <= r - 0.5)
    if shape == "square":
        return box
    if shape == "ring":
        return box & ~((np.abs(x - c) <= r - 0.5 - stroke) & (np.abs(y - c) <= r - 0.5 - stroke))
    if shape == "cross":
        return box & ((np.abs(x - c) <= stroke) | (np.abs(y - c) <= stroke))
    if shape == "triangle":  # apex up, base at the bottom of the box
        top, bottom = c - r, c + r
        half_width = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(x - c) <= half_width + 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, spec: SceneSpec) -> np.ndarray:
    """The scene as a ``(H, W, 3)`` uint8 image on a black background."""
    image = np.zeros((spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for obj in scene.objects:
        inset = (obj.cells * spec.patch - obj.side) // 2  # centre the box in its patches
        y0, x0 = obj.row * spec.patch + inset, obj.col * spec.patch + inset
        box = image[y0 : y0 + obj.side, x0 : x0 + obj.side]  # (side, side, 3), a view
        box[shape_mask(obj.shape, obj.side)] = COLORS[obj.color]
    return image


def _before(a: ToyObject, b: ToyObject, axis: str) -> bool | None:
    """Whether ``a`` lies wholly left of (``x``) or above (``y``) ``b``; None where they overlap along ``axis``."""
    start_a, start_b = (a.col, b.col) if axis == "x" else (a.row, b.row)
    if start_a + a.cells <= start_b:
        return True
    if start_b + b.cells <= start_a:
        return False
    return None


def _half(obj: ToyObject, axis: str) -> str | None:
    """The half of the image that ``obj`` is in along ``axis`` (``left``/``right`` or ``top``/``bottom``), read off its
    quadrant's name; None where the name has no word for that axis (a high-res image one tile wide or high)."""
    found = [word for word in obj.quadrant.split() if word in _HALVES[axis]]
    return found[0] if found else None


def solve(scene: Scene, category: str, named: tuple[tuple[str, str], ...], axis: str | None = None) -> str:
    """The answer to a question of type ``category`` naming ``named`` (as ``Question.named``) along ``axis`` (for
    ``relation`` and ``where``), read off the scene."""
    if category in ("compare", "relation"):
        first, second = (scene.by(**dict([item])) for item in named)
        if first is None or second is None:
            raise ValueError(f"no object with {named} in the scene")
        if category == "compare":
            return "yes" if first.size == "large" and second.size == "small" else "no"
        before = _before(first, second, axis)
        if before is None:
            raise ValueError(f"{named} overlap along {axis!r}")
        return "yes" if before else "no"
    if category == "exist":
        return "yes" if scene.by(**dict(named)) is not None else "no"
    obj = scene.by(**dict(named))
    if obj is None:
        raise ValueError(f"no object with {named} in the scene")
    if category == "where":
        half = _half(obj, axis)
        if half is None:
            raise ValueError(f"the image is one tile along {axis!r}: no half to name")
        return half
    return getattr(obj, _ASKS[category][1])


def _exist_named(rng: random.Random, scene: Scene, k: int) -> tuple[dict[str, str], str]:
    """What the k-th yes/no question of a split names: one shape or one color, present on even k (yes),
    absent on odd k (no)."""
    kind = rng.choice(("shape", "color"))
    values = SHAPES if kind == "shape" else tuple(COLORS)
    present = {getattr(o, kind) for o in scene.objects}
    absent = [v for v in values if v not in present]
    if k % 2 == 0:
        return {kind: getattr(rng.choice(scene.objects), kind)}, POPE_CATEGORIES[0]
    if not absent:  # every shape is in the scene (4 objects): ask about an absent color instead
        absent = [c for c in COLORS if c not in {o.color for o in scene.objects}]
        kind = "color"
    return {kind: rng.choice(absent)}, POPE_CATEGORIES[0]


def _compare_named(rng: random.Random, scene: Scene, k: int) -> tuple[tuple[str, str], ...] | None:
    """The two shapes the k-th ``compare`` question names: a "yes" pair (large, small) on even k, a "no" pair on odd
    k; None when the scene has no such pair."""
    pairs = list(itertools.permutations(scene.objects, 2))
    wanted = [(a, b) for a, b in pairs if (a.size == "large" and b.size == "small") == (k % 2 == 0)]
    if not wanted:
        return None
    a, b = rng.choice(wanted)
    return (("shape", a.shape), ("shape", b.shape))


def _relation_named(rng: random.Random, scene: Scene, k: int) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """The two shapes and the axis of the k-th ``relation`` question: the first object before the second (a "yes")
    on even k, after it on odd k, along an axis on which they do not overlap; None with fewer than two objects."""
    wanted = [
        (a, b, axis)
        for a, b in itertools.permutations(scene.objects, 2)
        for axis in _HALVES
        if _before(a, b, axis) is (k % 2 == 0)
    ]
    if not wanted:
        return None
    a, b, axis = rng.choice(wanted)
    return (("shape", a.shape), ("shape", b.shape)), axis


def _where_named(rng: random.Random, scene: Scene) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """The shape and the axis of a ``where`` question: an object and an axis along which the image has two halves."""
    wanted = [(o, axis) for o in scene.objects for axis in _HALVES if _half(o, axis) is not None]
    if not wanted:
        return None
    obj, axis = rng.choice(wanted)
    return (("shape", obj.shape),), axis


def ask(rng: random.Random, scene: Scene, category: str, k: int = 0) -> Question | None:
    """One question of type ``category``; ``k`` counts the questions of that type so far (for balancing). None
    when the scene cannot ask it (``compare`` needs two objects, and a large and a small one for a "yes";
    ``relation`` two objects)."""
    pope_category = None
    if category == "compare":
        pair = _compare_named(rng, scene, k)
        return None if pair is None else Question(category, pair, solve(scene, category, pair))
    if category in ("relation", "where"):
        found = _relation_named(rng, scene, k) if category == "relation" else _where_named(rng, scene)
        if found is None:
            return None
        named, axis = found
        return Question(category, named, solve(scene, category, named, axis), axis=axis)
    if category == "exist":
        named, pope_category = _exist_named(rng, scene, k)
    elif category in _ASKS:
        key = _ASKS[category][0]
        named = {key: getattr(rng.choice(scene.objects), key)}
    else:
        raise ValueError(f"unknown question type {category!r}")
    named = tuple(named.items())
    return Question(category, named, solve(scene, category, named), pope_category)


def make_split(
    seed: int, n_questions: int, spec: WorldSpec, split: str, exclude: set[tuple] | None = None
) -> list[tuple[Scene, list[Question]]]:
    """``n_questions`` questions over fresh scenes, an equal share of each type (the first types take the
    remainder). Each scene asks one question of every type that has some left and that the scene can ask.

    Scenes whose key is in ``exclude`` are redrawn (keeps test scenes out of the training set); ``split``
    seeds its own stream, so train and test differ for the same ``seed``.
    """
    rng = random.Random(f"toy-world/{seed}/{split}")
    types = spec.question_types
    quota = {c: n_questions // len(types) + (i < n_questions % len(types)) for i, c in enumerate(types)}
    left = dict(quota)
    out: list[tuple[Scene, list[Question]]] = []
    while any(left.values()):
        scene = spec.sample(rng)
        while exclude and scene.key() in exclude:
            scene = spec.sample(rng)
        questions = []
        for category in (c for c in types if left[c]):
            question = ask(rng, scene, category, quota[category] - left[category])
            if question is not None:
                questions.append(question)
                left[category] -= 1
        if questions:
            out.append((scene, questions))
    return out


def repaint(scene: Scene, target: ToyObject, color: str | None = None, shape: str | None = None) -> Scene:
    """The same scene with ``target`` painted ``color`` and/or drawn as ``shape`` (for tests: only the target's
    patches change)."""
    changed = replace(target, color=color or target.color, shape=shape or target.shape)
    return replace(scene, objects=tuple(changed if o == target else o for o in scene.objects))


def toy_words(question_types: tuple[str, ...] = ()) -> list[str]:
    """Every word a toy question or answer uses (the tokenizer adds the template's own words), then those of the
    axis questions (``relation``, ``where``) among ``question_types``."""
    # "human's" in the vicuna_v1 system prompt splits into  human ' s  under the word-level tokenizer
    # Words new to a version of the world go last, so that a trained toy model keeps its token ids.
    templates = {k: re.sub(r"\{\w*\}", " ", t) for k, t in _TEMPLATES.items()}
    compare = templates.pop("compare")
    texts = ["' s", *templates.values(), *QUADRANTS, *COLORS, *SHAPES, *SIZES, "yes no", compare]
    texts += [re.sub(r"\{\w*\}", " ", t) for c in question_types for t in _AXIS_TEMPLATES.get(c, {}).values()]
    words = [w for text in texts for w in text.replace("?", " ").lower().split()]
    return list(dict.fromkeys(words))
