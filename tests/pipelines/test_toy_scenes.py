"""The toy world's scenes and questions: deterministic, answers located in the named objects' patches."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import pytest

from pipelines.toy.scenes import (
    COLORS,
    POPE_CATEGORIES,
    QUADRANTS,
    QUESTION_TYPES,
    SHAPES,
    SceneSpec,
    make_split,
    render,
    repaint,
    sample_scene,
    shape_mask,
    solve,
)

SPEC = SceneSpec(question_types=QUESTION_TYPES)


def patch_mask(patches: set[int], spec: SceneSpec) -> np.ndarray:
    """Boolean (H, W) mask of the pixels under the given vision-token indices."""
    grid = np.zeros((spec.grid, spec.grid), dtype=bool)
    grid.flat[list(patches)] = True
    return np.kron(grid, np.ones((spec.patch, spec.patch), dtype=bool)).astype(bool)


@pytest.fixture(scope="module")
def split():
    return make_split(seed=3, n_questions=3_200, spec=SPEC, split="train")


def test_same_seed_same_world_other_seed_or_split_differs(split):
    again = make_split(seed=3, n_questions=3_200, spec=SPEC, split="train")
    assert again == split
    assert all(np.array_equal(render(a, SPEC), render(b, SPEC)) for (a, _), (b, _) in zip(again, split))
    assert make_split(seed=4, n_questions=3_200, spec=SPEC, split="train") != split
    assert make_split(seed=3, n_questions=3_200, spec=SPEC, split="test") != split


def test_question_count_and_types(split):
    questions = [q for _, qs in split for q in qs]
    assert len(questions) == 3_200
    assert Counter(q.category for q in questions) == dict.fromkeys(QUESTION_TYPES, 400)


def test_objects_are_unique_disjoint_and_drawn_inside_their_patches(split):
    for scene, _ in split[:200]:
        shapes = [o.shape for o in scene.objects]
        colors = [o.color for o in scene.objects]
        assert SPEC.min_objects <= len(shapes) <= SPEC.max_objects
        assert len(set(shapes)) == len(shapes) and len(set(colors)) == len(colors)
        assert len({o.quadrant for o in scene.objects}) == len(shapes)
        covered = [o.patches(SPEC.grid) for o in scene.objects]
        assert sum(map(len, covered)) == len(set().union(*covered))  # no two objects share a patch
        image = render(scene, SPEC)
        for obj, patches in zip(scene.objects, covered, strict=True):
            inside = patch_mask(patches, SPEC)
            painted = (image == COLORS[obj.color]).all(-1)
            assert painted[inside].sum() >= SPEC.patch  # the object is visible
            assert not painted[~inside].any()  # and nowhere else
            assert len(patches) <= 4  # a few of the 64 vision tokens


def test_every_answer_is_read_from_the_scene(split):
    for scene, questions in split:
        for q in questions:
            assert solve(scene, q.category, q.named, q.axis) == q.answer
            assert len(q.answer.split()) == 1


def test_repainting_the_named_object_changes_only_its_patches_and_the_answer(split):
    rng = random.Random(0)
    for scene, questions in split[:300]:
        for q in questions:
            if q.category == "color":
                (target,) = q.targets(scene)
            elif q.category == "exist" and q.answer == "yes" and "color" in dict(q.named):
                target = scene.by(**dict(q.named))
            else:
                continue
            unused = [c for c in COLORS if c not in {o.color for o in scene.objects}]
            repainted = repaint(scene, target, rng.choice(unused))
            changed = (render(scene, SPEC) != render(repainted, SPEC)).any(-1)
            assert changed.any() and not changed[~patch_mask(target.patches(SPEC.grid), SPEC)].any()
            assert solve(repainted, q.category, q.named) != q.answer


def test_repainting_other_objects_never_changes_an_attribute_answer(split):
    for scene, questions in split[:300]:
        for q in questions:
            if q.category not in ("color", "size", "position"):
                continue
            (target,) = q.targets(scene)
            others = [o for o in scene.objects if o != target]
            unused = [c for c in COLORS if c not in {o.color for o in scene.objects}]
            for other, color in zip(others, unused, strict=False):
                assert solve(repaint(scene, other, color), q.category, q.named) == q.answer


def test_position_questions_name_the_quadrant_of_their_object(split):
    half = SPEC.grid // 2
    for scene, questions in split:
        for q in questions:
            if q.category == "position":
                (target,) = q.targets(scene)
                quadrant = QUADRANTS.index(dict(q.named)["quadrant"])
                rows = {p // SPEC.grid for p in target.patches(SPEC.grid)}
                cols = {p % SPEC.grid for p in target.patches(SPEC.grid)}
                assert {r // half for r in rows} == {quadrant // 2} and {c // half for c in cols} == {quadrant % 2}


def test_relation_and_where_questions_follow_the_patches_and_are_balanced(split):
    half = SPEC.grid // 2
    relations = Counter()
    for scene, questions in split:
        for q in questions:
            index = 1 if q.axis == "x" else 0  # which of a patch's (row, col) the question is about
            if q.category == "relation":
                first, second = (scene.by(shape=value) for _, value in q.named)
                a, b = ({divmod(p, SPEC.grid)[index] for p in o.patches(SPEC.grid)} for o in (first, second))
                assert max(a) < min(b) or max(b) < min(a)  # apart along the axis
                assert q.answer == ("yes" if max(a) < min(b) else "no")
                relations[q.answer] += 1
            elif q.category == "where":
                (target,) = q.targets(scene)
                halves = {divmod(p, SPEC.grid)[index] // half for p in target.patches(SPEC.grid)}
                assert halves == {(("left", "right") if q.axis == "x" else ("top", "bottom")).index(q.answer)}
    assert relations == {"yes": 200, "no": 200}


def test_compare_questions_name_two_objects_and_are_balanced(split):
    answers = Counter()
    for scene, questions in split:
        for q in questions:
            if q.category == "compare":
                first, second = ([o for o in scene.objects if o.shape == value] for _, value in q.named)
                assert len(first) == len(second) == 1 and first != second  # two objects of the scene, named by shape
                (first,), (second,) = first, second
                assert set(q.targets(scene)) == {first, second}
                bigger = len(first.patches(SPEC.grid)) > len(second.patches(SPEC.grid))  # 2 x 2 patches against 1
                assert q.answer == ("yes" if bigger else "no")
                assert q.text == f"Is the {first.shape} bigger than the {second.shape}?"
                answers[q.answer] += 1
    assert answers == {"yes": 200, "no": 200}


def test_yes_no_is_balanced_overall_and_per_pope_category(split):
    exist = [q for _, qs in split for q in qs if q.category == "exist"]
    assert Counter(q.answer for q in exist) == {"yes": 200, "no": 200}
    assert {q.pope_category for q in exist} == set(POPE_CATEGORIES)


def test_existence_questions_name_one_thing_and_negatives_are_absent(split):
    kinds = Counter()
    for scene, questions in split:
        for q in questions:
            if q.category == "exist":
                ((kind, value),) = q.named  # one shape or one color, as POPE names one object
                kinds[kind] += 1
                present = {getattr(o, kind) for o in scene.objects}
                assert (value in present) == (q.answer == "yes")
    assert kinds["shape"] > 100 and kinds["color"] > 100


def test_scenes_cover_the_vocabulary():
    rng = random.Random(0)
    scenes = [sample_scene(rng, SPEC) for _ in range(300)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and {o.color for o in objects} == set(COLORS)
    assert {o.quadrant for o in objects} == set(QUADRANTS) and {o.size for o in objects} == {"small", "large"}


def test_bad_spec_fails_with_its_key():
    with pytest.raises(ValueError, match="question_types"):
        SceneSpec(question_types=("colour",))
    with pytest.raises(ValueError, match="max_objects"):
        SceneSpec(max_objects=5)
    with pytest.raises(ValueError, match="grid"):
        SceneSpec(grid=7)


@pytest.mark.parametrize("side", [SceneSpec().small_px, SceneSpec().large_px])
def test_shapes_differ_in_every_patch_they_cover(side):
    # A vision token sees one patch: a small shape whole, a large one by quarters. Any two shapes must differ
    # in at least 1/8 of the pixels of every patch they cover, or the tower cannot tell them apart quickly.
    patch = SceneSpec().patch
    masks = {shape: shape_mask(shape, side) for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        for r in range(0, side, patch):
            for c in range(0, side, patch):
                differ = masks[a][r : r + patch, c : c + patch] != masks[b][r : r + patch, c : c + patch]
                assert differ.sum() >= patch * patch / 8, (a, b, side, r, c, int(differ.sum()))
