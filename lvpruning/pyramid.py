"""LRS-VQA's Dynamic Image Pyramid (``pyramid_crop`` in the reference's ``llava/mm_utils.py``) and its coarse-to-fine
selection (``select_attention_indices_via_ratio``, ``get_next_level_fea`` in its projector ``builder.py``), as pure
functions. Our reading: ``docs/methods.md``, "LRS-VQA".

An image is cut at several scales into ``tile x tile`` tiles: from the full image down to a base level of about
``base_long_side`` pixels on its long side, halving each time, plus one global view. The Region Focus Module scores
the tokens of the coarsest tiled level; the kept tokens name the tiles of the next finer level that are encoded.

Shapes: H x W the image, h x w a level's token grid (its newline column included), N = h * w tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 336  # the CLIP tower's input (``slice_block_size``)
BASE_LONG_SIDE = 1008  # the coarsest tiled level's long side (``base_HR_img_long_side``)


@dataclass(frozen=True)
class PyramidLevel:
    """One scale: the image resized to ``resized`` (height, width) pixels, padded bottom/right to ``blocks``
    (rows, columns) of tiles."""

    ratio: float
    resized: tuple[int, int]
    blocks: tuple[int, int]


def pyramid_ratios(height: int, width: int, tile: int = TILE, base_long_side: int = BASE_LONG_SIDE) -> list[float]:
    """The scales, largest first: 1, 1/2, 1/4, ... down to ``min(base_long_side / long side, 1)`` (included), and
    last the global view's ``min(tile / height, tile / width)``; no scale twice."""
    floor = min(base_long_side / max(height, width), 1.0)
    halvings = [0.5**i for i in range(64) if 0.5**i >= floor]
    ratios = {*halvings, floor, min(tile / height, tile / width)}
    return sorted(ratios, reverse=True)


def pyramid_level(height: int, width: int, ratio: float, tile: int = TILE) -> PyramidLevel:
    """The geometry of one scale: the image scaled by ``ratio`` (rounded), then resized to fill its grid of tiles
    along the tighter side (``min`` of the two fill factors), the tiles counted again on the result."""
    h, w = round(height * ratio), round(width * ratio)
    fill = min(math.ceil(h / tile) * tile / h, math.ceil(w / tile) * tile / w)
    resized = (round(h * fill), round(w * fill))
    return PyramidLevel(ratio, resized, (math.ceil(resized[0] / tile), math.ceil(resized[1] / tile)))


def pyramid_crop(
    image: torch.Tensor, tile: int = TILE, base_long_side: int = BASE_LONG_SIDE
) -> tuple[torch.Tensor, list[torch.Tensor], list[PyramidLevel]]:
    """Cut ``image`` (3, H, W) (normalised: the zero padding is the mean colour) into the global view
    (3, tile, tile), its content top-left, and the tiled levels, coarsest first: each (rows, columns, 3, tile, tile)
    with its ``PyramidLevel``. Resizing is bilinear (``align_corners=False``, no antialiasing), as the reference's."""
    H, W = image.shape[-2:]
    ratios = pyramid_ratios(H, W, tile, base_long_side)
    tiles, levels = [], []
    for ratio in ratios:
        level = pyramid_level(H, W, ratio, tile)
        rows, cols = level.blocks if ratio != ratios[-1] else (1, 1)
        canvas = image.new_zeros(3, rows * tile, cols * tile)
        resized = F.interpolate(image[None], size=level.resized, mode="bilinear")[0]
        canvas[:, : level.resized[0], : level.resized[1]] = resized
        if ratio == ratios[-1]:
            return canvas, tiles[::-1], levels[::-1]
        tiles.append(canvas.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4))  # (rows, cols, 3, tile, tile)
        levels.append(level)
    raise AssertionError("pyramid_ratios always ends with the global view")


def keep_top_share(scores: torch.Tensor, valid: torch.Tensor, row_length: int, share: float) -> torch.Tensor:
    """The tokens a level keeps, sorted: the ``int(share * |valid|)`` best-scoring ``valid`` tokens of ``scores``
    (N,), and every row's newline token (each ``row_length``-th, the last of a row) whatever its score."""
    n = int(int(valid.sum()) * share)
    top = scores.float().masked_fill(~valid, float("-inf")).topk(n).indices
    newlines = torch.arange(row_length - 1, scores.shape[0], row_length, device=scores.device)
    return torch.cat([top, newlines]).unique()


def next_level_tiles(kept: torch.Tensor, grid: tuple[int, int], blocks: tuple[int, int]) -> torch.Tensor:
    """The next finer level's tiles (T, 2) (row, column), raster order, under the tokens ``kept`` (M,) of an
    ``h x w`` token ``grid``: token (i, j) falls on tile ``(floor(i * rows / h), floor(j * cols / w))`` of the
    next level's ``blocks`` = (rows, cols); every tile hit at least once is taken."""
    (h, w), (rows, cols) = grid, blocks
    i, j = kept // w, kept % w
    return torch.stack([i * rows // h, j * cols // w], dim=1).unique(dim=0)  # unique sorts rows: raster order


def unpadded_grid(padded: tuple[int, int], resized: tuple[int, int]) -> tuple[int, int]:
    """The token grid (rows, columns) left of a level's ``padded`` grid once its padding is cut off: the content
    sits top-left, with the aspect of the level's ``resized`` (height, width) pixels (``unpad_image_hw``)."""
    (rows, cols), (height, width) = padded, resized
    if width / height > cols / rows:
        return int(height * (cols / width)), cols
    return rows, int(width * (rows / height))


def place_tiles(
    features: torch.Tensor,
    tiles: torch.Tensor,
    level: PyramidLevel,
    newline: torch.Tensor,
    aspect: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A level's token sequence with only ``tiles`` (T, 2) (row, column) encoded: their (pooled) features
    (T, p, p, C) set into the level's ``rows * p x cols * p`` grid, the rest zeros, the padding cut off
    (``unpadded_grid``) to the aspect of ``aspect`` (height, width) (default the level's resized pixels; the
    reference cuts the coarsest level to the original image's, ``unpad_image(..., image.size)``), a ``newline``
    (C,) token closing every row. Returns the tokens (N, C), which of them are real (N,) (encoded or newline), and
    the grid (h, w) with the newline column."""
    T, p, _, C = features.shape
    rows, cols = level.blocks
    grid = features.new_zeros(rows * p, cols * p, C)
    real = torch.zeros(rows * p, cols * p, dtype=torch.bool, device=features.device)
    for (r, c), feature in zip(tiles.tolist(), features, strict=True):
        grid[r * p : (r + 1) * p, c * p : (c + 1) * p] = feature
        real[r * p : (r + 1) * p, c * p : (c + 1) * p] = True
    h, w = unpadded_grid((rows * p, cols * p), aspect or level.resized)
    grid = torch.cat([grid[:h, :w], newline.to(grid.dtype).expand(h, 1, C)], dim=1)  # (h, w + 1, C)
    real = torch.cat([real[:h, :w], real.new_ones(h, 1)], dim=1)
    return grid.reshape(-1, C), real.reshape(-1), (h, w + 1)
