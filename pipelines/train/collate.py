"""Pad model-input rows into a batch: right padding for training, left for generation.

Rows carry ``input_ids`` / ``attention_mask`` / ``labels`` (L,) and an image's inputs, as ``pipelines.train.data``
makes them: ``pixel_values`` (3, H, W); for the tiled families (S, 3, H, W) with ``image_sizes`` (2,); for Qwen-VL
(P, D) patches with ``image_grid_thw`` (3,). Shapes: B = batch, T = longest row of the batch, S tiles, P patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines.conversation import IGNORE_INDEX, MODEL_INPUTS, SIZE_KEYS
from pipelines.images import batch_images


def collate(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad rows into a batch of torch tensors: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 0 on pads, the images batched by :func:`pipelines.images.batch_images` (tiles zero-padded,
    Qwen-VL's patches concatenated) with their size key where rows have one.

    ``rows`` is a list of rows, or Ray's column batch (``iter_torch_batches(collate_fn=...)`` passes one).
    Right padding is for training, left for generation. Returns (B, T) int64 tensors and the images' tensors.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(rows, Mapping):
        names = [name for name in (*MODEL_INPUTS, *SIZE_KEYS) if name in rows]
        rows = [{name: rows[name][i] for name in names} for i in range(len(rows["input_ids"]))]
    if not rows:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(row["input_ids"]) for row in rows)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for name, pad in pads.items():
        padded = np.full((len(rows), longest), pad, dtype=np.int64)  # (B, T)
        for b, row in enumerate(rows):
            values = np.asarray(row[name], dtype=np.int64)
            if padding_side == "right":
                padded[b, : len(values)] = values
            else:
                padded[b, longest - len(values) :] = values
        batch[name] = torch.from_numpy(padded)
    image_keys = [name for name in ("pixel_values", *SIZE_KEYS) if name in rows[0]]
    return batch | batch_images({name: [row[name] for row in rows] for name in image_keys})


class PaddingCollateFn(NumpyBatchCollateFn):
    """``collate`` as Ray's collate class: ``iter_torch_batches(collate_fn=PaddingCollateFn(pad_id))``."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id, self.padding_side)
