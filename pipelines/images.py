"""The one image loader of the jobs: a local path or ``s3://`` object -> an RGB image, LLaVA-1.5's square padding.

Training data (``pipelines.train.data``), evaluation (``pipelines.eval.inference``) and calibration read images here,
so a missing or corrupt file is the same ``RecordError`` reason everywhere (``missing_image``, ``corrupt_image``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines import storage
from pipelines.conversation import SIZE_KEYS, RecordError, any_resolution

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
    (``--image_aspect_ratio pad``); None for the families that take an image as it is (tiles, Qwen-VL)."""
    return None if any_resolution(processor) else mean_colour(processor)


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


def batch_images(images: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """One image per sample into the model's batch tensors, from per-sample arrays (``pixel_values`` and a size key
    of ``SIZE_KEYS`` where the model takes one, as ``pipelines.conversation.image_inputs`` makes them):

    - ``pixel_values`` (B, 3, H, W) from (3, H, W) arrays (LLaVA-1.5; LRS-VQA's pyramid takes whole images of
      different sizes, each top-left, zero beyond, with ``image_sizes``);
    - (B, S, 3, H, W) from tiled (S_b, 3, H, W) arrays, zero-padded to the largest S as the LLaVA-NeXT processors pad
      (the model reads only an image's own tiles, from ``image_sizes`` (B, 2));
    - Qwen-VL's (sum P_b, D) from (P_b, D) patches, concatenated in sample order as its processor flattens a batch,
      with ``image_grid_thw`` (B, 3).
    """
    import numpy as np
    import torch

    arrays = [np.asarray(p, dtype=np.float32) for p in images["pixel_values"]]
    sizes = [name for name in SIZE_KEYS if name in images]
    out = {name: torch.from_numpy(np.stack([np.asarray(s, np.int64) for s in images[name]])) for name in sizes}
    if "image_grid_thw" in images:
        return {"pixel_values": torch.from_numpy(np.concatenate(arrays))} | out
    if arrays[0].ndim == 4:
        tiles = max(a.shape[0] for a in arrays)
        arrays = [np.concatenate([a, np.zeros((tiles - a.shape[0], *a.shape[1:]), np.float32)]) for a in arrays]
    elif len({a.shape for a in arrays}) > 1:
        height, width = (max(a.shape[i] for a in arrays) for i in (1, 2))
        arrays = [np.pad(a, ((0, 0), (0, height - a.shape[1]), (0, width - a.shape[2]))) for a in arrays]
    return {"pixel_values": torch.from_numpy(np.stack(arrays))} | out


def token_types(inputs: Mapping[str, Any], image_token_id: int) -> dict[str, Any]:
    """``inputs`` as Hugging Face's own Qwen-VL takes them: with ``mm_token_type_ids`` (B, N), 1 on image tokens, as
    its processor returns them, from which it computes its 3-D positions (without them it falls back to 1-D text
    positions, silently); the other models' inputs as they are. For the base model called directly (the ``none``
    setting, the toy ``base`` stage, calibration's reference); ``LVPruningModel`` computes its positions itself."""
    if "image_grid_thw" not in inputs:
        return dict(inputs)
    return dict(inputs) | {"mm_token_type_ids": (inputs["input_ids"] == image_token_id).int()}
