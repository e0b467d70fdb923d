"""The high-resolution toy world, for LLaVA-NeXT's anyres: objects that only a full-resolution tile can read.

LLaVA-NeXT shows the tower each image twice: a *base view*, the whole image resized (bicubic) to the tower's
``tile x tile`` input, and a grid of full-resolution ``tile x tile`` *tiles*. Here an image is a ``rows x cols`` grid
of tiles (``ASPECTS``: 128 x 128 in 2 x 2 tiles, 64 x 128 in 1 x 2, 128 x 64 in 2 x 1, height x width), so the base
view halves the image along each axis that has two tiles, and the tiles are the image itself.

An object is a flat grey box (``GREY``) with its shape drawn inside as a 1-pixel checkerboard of its color and the
complement of that color about ``GREY`` (``c`` on even pixels, ``2 * GREY - c`` on odd ones). Every 2 pixels along
a halved axis average to ``GREY``, so the base view shows a grey blob where each object is (its place and size) and
neither its color nor its shape; a tile shows both. Shapes are ``shape_mask`` drawn in 2 x 2-pixel cells and their
edges softened by ``[1/4, 1/2, 1/4]`` along each axis: a sharp edge in the checkerboard's strength would leak into
the base view (13% of the jump at one axis halved, measured); the softening has no response at the checkerboard's
frequency, so the leak falls to PIL's rounding (test_toy_hires.py measures it on the processor's own base view).

Objects keep the toy world's rules (distinct shapes and colors, aligned to the ``patch`` grid) and each sits in
its own ``tile/2``-pixel slot, inside one tile; ``ToyObject.quadrant`` names that tile ("top left", or "left" in a
1 x 2 image). Questions are the toy world's (``scenes.ask``); by default ``color``, ``shape``, ``exist``,
``relation`` and ``where``, whose ``where`` answer names the tile column or row. A model of this world needs
``toy_words(spec.question_types)``.

Vision tokens per image (``vision_tokens``, patch 8, "default" feature selection): base 64 + tiles
``rows * cols * 64`` + one newline per row of tile patches: 336 for 128 x 128, 200 for 64 x 128, 208 for 128 x 64.

The ``large`` aspect (256 x 256 in 4 x 4 tiles; the large-image world, ``writer.LARGE``, LRS-VQA's setting) is past
the toy LLaVA-NeXT's own grids: 1,120 vision tokens, and its halves are each 2 x 2 tiles, which ``ToyObject.quadrant``
names as for a 2 x 2 image. Halved once, it is a 2 x 2 grid of tiles of grey blobs (where the objects are); only the
full-resolution tiles say what they are: the two levels of LRS-VQA's pyramid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.toy.scenes import COLORS, SHAPES, Scene, ToyObject, check_objects, check_question_types, shape_mask

# tile rows, tile cols; "large": the large-image world's (LRS-VQA's setting), past the toy LLaVA-NeXT's own grids
ASPECTS: dict[str, tuple[int, int]] = {"square": (2, 2), "wide": (1, 2), "tall": (2, 1), "large": (4, 4)}
GREY = 128  # every object's mean color: all the base view sees of it
CELL = 2  # shapes are drawn in CELL x CELL pixels, so that their strokes survive the softening
SOFTEN = (0.25, 0.5, 0.25)  # zero response at the checkerboard's frequency (1/2 cycle per pixel)
_SLOTS = 2  # slots per tile side


@dataclass(frozen=True)
class HiresSpec:
    """How high-resolution scenes and questions are drawn.

    ``tile`` is the tower's input side (the base view's and every tile's) and ``patch`` its patch: 64 and 8 give
    the tower 64 tokens per view, as the low-res toy model, and 5 views per square image, so that the toy
    LLaVA-NeXT costs about 5 times the toy LLaVA per step on a CPU (measured: ``benchmarks/TOY_WORLD.md``). ``aspects``
    (names in ``ASPECTS``) are drawn per scene from the seed: several give images with different token counts.
    """

    tile: int = 64
    patch: int = 8
    aspects: tuple[str, ...] = ("square",)
    min_objects: int = 1
    max_objects: int = 4
    question_types: tuple[str, ...] = ("color", "shape", "exist", "relation", "where")
    large_fraction: float = 0.5
    small_px: int = 12  # box sides in pixels: 6 and 10 cells of 2 pixels, in 2 x 2 and 3 x 3 tile patches
    large_px: int = 20

    def __post_init__(self) -> None:
        unknown = set(self.aspects) - set(ASPECTS)
        if unknown or not self.aspects:
            raise ValueError(f"aspects must be a non-empty subset of {tuple(ASPECTS)}, got {unknown}")
        if self.tile % (_SLOTS * self.patch):
            raise ValueError(f"tile must be a multiple of {_SLOTS} patches, got tile {self.tile}, patch {self.patch}")
        check_objects(self.min_objects, self.max_objects, len(SHAPES))
        slot = self.tile // _SLOTS
        if not (5 * CELL <= self.small_px < self.large_px and self.cells("large") * self.patch <= slot) or (
            self.small_px % CELL or self.large_px % CELL
        ):
            raise ValueError(
                f"small_px, large_px must be multiples of {CELL} with {5 * CELL} <= small < large and large in "
                f"whole patches <= {slot} (a slot), got {self.small_px}, {self.large_px}"
            )
        check_question_types(self.question_types)

    def side(self, size: str) -> int:
        return self.small_px if size == "small" else self.large_px

    def cells(self, size: str) -> int:
        """Patches per side that an object of ``size`` covers."""
        return -(-self.side(size) // self.patch)

    def image_size(self, aspect: str) -> tuple[int, int]:
        """``(height, width)`` in pixels of an image of ``aspect``."""
        rows, cols = ASPECTS[aspect]
        return rows * self.tile, cols * self.tile

    def sample(self, rng: random.Random) -> Scene:
        return sample_hires_scene(rng, self)

    def render(self, scene: Scene) -> np.ndarray:
        return render_hires(scene, self)


def _tile_name(tile_row: int, tile_col: int, rows: int, cols: int) -> str:
    """The quarter of the image a tile is in: "top left" in a 2 x 2 grid (or for the 4 top-left tiles of a 4 x 4
    one), "left" in a 1 x 2 one, "top" in a 2 x 1 one."""
    words = [("top", "bottom")[2 * tile_row // rows]] if rows > 1 else []
    words += [("left", "right")[2 * tile_col // cols]] if cols > 1 else []
    return " ".join(words)


def sample_hires_scene(rng: random.Random, spec: HiresSpec) -> Scene:
    """An image size from ``spec.aspects``; distinct shapes, colors and slots; positions aligned to the patch grid."""
    aspect = rng.choice(spec.aspects)
    rows, cols = ASPECTS[aspect]
    slot_cells = spec.tile // _SLOTS // spec.patch  # patches per slot side
    slots_across = cols * _SLOTS
    n_objects = rng.randint(spec.min_objects, spec.max_objects)
    shapes = rng.sample(SHAPES, n_objects)
    colors = rng.sample(list(COLORS), n_objects)
    slots = rng.sample(range(rows * cols * _SLOTS**2), n_objects)
    objects = []
    for shape, color, slot in zip(shapes, colors, slots, strict=True):
        size = "large" if rng.random() < spec.large_fraction else "small"
        cells = spec.cells(size)
        slot_row, slot_col = divmod(slot, slots_across)
        row = slot_row * slot_cells + rng.randint(0, slot_cells - cells)  # the object stays inside its slot
        col = slot_col * slot_cells + rng.randint(0, slot_cells - cells)
        tile = _tile_name(slot_row // _SLOTS, slot_col // _SLOTS, rows, cols)
        objects.append(ToyObject(shape, color, size, row, col, tile, cells, spec.side(size)))
    return Scene(tuple(objects), size=spec.image_size(aspect))


def _soften(mask: np.ndarray) -> np.ndarray:
    """``mask`` (float, zero on its border) filtered by ``SOFTEN`` along both axes."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in (0, 1)])
        n = out.shape[axis]
        out = sum(w * padded.take(range(i, i + n), axis=axis) for i, w in enumerate(SOFTEN))
    return out


def render_hires(scene: Scene, spec: HiresSpec) -> np.ndarray:
    """The scene as a ``(height, width, 3)`` uint8 image on a black background (module docstring: the drawing)."""
    height, width = scene.size
    image = np.zeros((height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    sign = np.where((y + x) % 2 == 0, 1.0, -1.0)[..., None]  # (H, W, 1): the color on even pixels, its complement
    for obj in scene.objects:
        inset = (obj.cells * spec.patch - obj.side) // 2  # centre the box in its patches
        y0, x0 = obj.row * spec.patch + inset, obj.col * spec.patch + inset
        cells = shape_mask(obj.shape, obj.side // CELL).astype(np.float64)  # (side / CELL, side / CELL)
        strength = _soften(np.kron(cells, np.ones((CELL, CELL))))  # (side, side), 1 inside the shape, 0 outside
        offset = strength[..., None] * (np.array(COLORS[obj.color]) - GREY)  # (side, side, 3)
        box = GREY + sign[y0 : y0 + obj.side, x0 : x0 + obj.side] * offset
        image[y0 : y0 + obj.side, x0 : x0 + obj.side] = np.clip(np.round(box), 0, 255)
    return image


def base_view(image: np.ndarray, spec: HiresSpec) -> np.ndarray:
    """The base view of ``image``: resized to ``tile x tile`` as LLaVA-NeXT's image processor does (PIL bicubic)."""
    return np.asarray(Image.fromarray(image).resize((spec.tile, spec.tile), Image.Resampling.BICUBIC))


def tiles(image: np.ndarray, spec: HiresSpec) -> list[np.ndarray]:
    """The full-resolution tiles of ``image``, row-major (LLaVA-NeXT's order)."""
    height, width = image.shape[:2]
    corners = [(r, c) for r in range(0, height, spec.tile) for c in range(0, width, spec.tile)]
    return [image[r : r + spec.tile, c : c + spec.tile] for r, c in corners]


def image_grid_pinpoints(spec: HiresSpec) -> list[list[int]]:
    """The ``image_grid_pinpoints`` (height, width) of an image processor for the world: one per aspect."""
    return [list(spec.image_size(aspect)) for aspect in spec.aspects]


def vision_tokens(spec: HiresSpec, height: int, width: int) -> int:
    """Vision tokens of a ``height x width`` image of the world: base view + tiles + a newline per row of tile
    patches (LLaVA-NeXT with "default" feature selection; no padding, as the image fills its tile grid)."""
    side = spec.tile // spec.patch  # patches per view side
    rows, cols = height // spec.tile, width // spec.tile
    return side * side + rows * cols * side * side + rows * side
