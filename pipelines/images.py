"""The one image loader of the jobs: a local path or ``s3://`` object -> an RGB image, LLaVA-1.5's square padding.

Training data (``pipelines.train.data``), evaluation (``pipelines.eval.inference``) and calibration read images here,
so a missing or corrupt file is the same ``RecordError`` reason everywhere (``missing_image``, ``corrupt_image``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from pipelines import storage
from pipelines.conversation import RecordError, tiled

IMAGE_SKIPS = ("no_image", "missing_image", "corrupt_image")  # the RecordError reasons of load_image


def expand_to_square(image: Any, background: tuple[int, int, int]) -> Any:
    """LLaVA-1.5's ``expand2square``: pad the short side (centred) with the image processor's mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def square_background(processor: Any) -> tuple[int, int, int] | None:
    """The colour ``load_image`` pads to a square with for ``processor``'s model: LLaVA-1.5's mean colour
    (``--image_aspect_ratio pad``); None for the tiled families, which take an image as it is."""
    return None if tiled(processor) else mean_colour(processor)


def mean_colour(processor: Any) -> tuple[int, int, int]:
    """The image processor's mean as an RGB colour: the background ``expand_to_square`` pads with."""
    return tuple(int(x * 255) for x in processor.image_processor.image_mean)


def load_image(image_root: str, relative: str, square: tuple[int, int, int] | None = None) -> Any:
    """The RGB image at ``image_root`` / ``relative``, decoded now (a truncated file fails here, not inside the
    processor); padded to a square of colour ``square`` when given. ``RecordError`` names why it cannot be used."""
    from PIL import Image

    if not relative:
        raise RecordError("no_image", "the record names no image")
    path = storage.join(image_root, relative)
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError) as e:
        raise RecordError("missing_image", path) from e
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise RecordError("corrupt_image", f"{path}: {e}") from e
    return expand_to_square(image, square) if square is not None else image


def stack_pixels(pixels: Sequence[Any]) -> Any:
    """One image per sample into a batch tensor: (B, 3, H, W) from (3, H, W) arrays, or (B, S, 3, H, W) from tiled
    (S_b, 3, H, W) arrays, zero-padded to the largest S as the LLaVA-NeXT processors pad (the model reads only an
    image's own tiles, from ``image_sizes``)."""
    import numpy as np
    import torch

    arrays = [np.asarray(p, dtype=np.float32) for p in pixels]
    if arrays[0].ndim == 4:
        tiles = max(a.shape[0] for a in arrays)
        arrays = [np.concatenate([a, np.zeros((tiles - a.shape[0], *a.shape[1:]), np.float32)]) for a in arrays]
    return torch.from_numpy(np.stack(arrays))
