"""Prefill FLOPs of Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's vision side: the image's patch grid and the tower as HF
runs it.

An image of H x W pixels is resized by the processor's ``smart_resize`` (both sides multiples of
``patch_size * spatial_merge_size`` = 28, the area kept within the published ``min_pixels`` / ``max_pixels``),
cut into an (h, w) grid of 14 x 14 patches (each image is repeated to ``temporal_patch_size`` frames: t = 1),
embedded by a Conv3d, run through ``depth`` blocks, and merged 2 x 2 by the ``PatchMerger``: h * w / 4 vision
tokens reach the decoder. Qwen2.5-VL's blocks attend within windows of ``window_size // patch_size //
spatial_merge_size`` = 4 x 4 merged cells (8 x 8 patches), partial windows at the bottom and right edges being
smaller, not padded (HF splits the sequence at ``cu_window_seqlens`` and runs one unpadded attention per window),
except the blocks in ``fullatt_block_indexes``, which attend over the whole frame; Qwen2-VL's blocks all do.
Qwen3-VL: 16-pixel patches (multiples of 32), its processor's own pixel bounds, full attention in every block, a
learned position grid resampled to the image (a weighted sum: no matmul), and besides the merger one DeepStack
merger per ``deepstack_visual_indexes`` block (the same shape: they all run, whatever is pruned later).
Counted as in ``lvpruning.flops``: matmuls only, ``2 m n k`` each. ``lvpruning.flops`` imports this module,
never the reverse. The measured count runs HF's tower as it is, on ``meta`` too: ``image_grid_thw`` stays on the
CPU, so HF computes the windows and ``cu_seqlens`` from its values and runs one attention per segment; only the
positions, which are values and no matmul, are helped onto ``meta`` (:func:`positions_on_meta`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the PIL backend: no torchvision
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from lvpruning.engine import LVPruningModel

QwenVLConfig = Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig
QWEN_CONFIGS = (Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig)
# (H, W) when no image size is given: a 48 x 48 patch grid, 576 vision tokens (Qwen3-VL: 42 x 42, 441)
QWEN_IMAGE_SIZE = (672, 672)
# The published checkpoints' preprocessor_config.json (Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-*-Instruct)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 16384
# Qwen/Qwen3-VL-*-Instruct's (its "size": shortest_edge and longest_edge, in pixels of area)
QWEN3_MIN_PIXELS = 256 * 256
QWEN3_MAX_PIXELS = 4096 * 4096


def is_qwen_vl(config: PreTrainedConfig) -> bool:
    """Whether ``config`` is a Qwen2-VL, Qwen2.5-VL or Qwen3-VL config."""
    return isinstance(config, QWEN_CONFIGS)


def patch_grid(config: QwenVLConfig, image_size: Sequence[int] | None = None) -> tuple[tuple[int, int], int, int]:
    """The resized (H, W) of an ``image_size`` (H, W) image (default ``QWEN_IMAGE_SIZE``), as the processor's
    ``smart_resize`` gives it, and its patch grid h, w (``image_grid_thw`` = (1, h, w))."""
    size = [int(x) for x in (image_size or QWEN_IMAGE_SIZE)]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be two positive integers H W, got {list(image_size or ())}")
    v = config.vision_config
    factor = v.patch_size * v.spatial_merge_size
    bounds = (
        (QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS)
        if isinstance(config, Qwen3VLConfig)
        else (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    )
    height, width = smart_resize(size[0], size[1], factor, *bounds)  # ValueError: > 200:1
    return (height, width), height // v.patch_size, width // v.patch_size


def processor_image_size(
    config: QwenVLConfig, min_pixels: int, max_pixels: int, image_size: Sequence[int] | None = None
) -> tuple[int, int]:
    """``image_size`` (H, W) (default ``QWEN_IMAGE_SIZE``) as a processor bounded by ``min_pixels`` and
    ``max_pixels`` of area resizes it (``smart_resize``): the image a model with that processor reads."""
    size = [int(x) for x in (image_size or QWEN_IMAGE_SIZE)]
    v = config.vision_config
    return smart_resize(size[0], size[1], v.patch_size * v.spatial_merge_size, min_pixels, max_pixels)


def window_lengths(config: QwenVLConfig, h: int, w: int) -> list[int]:
    """Patches in each attention window of one frame of h x w patches, as ``get_vision_window_index`` cuts it:
    windows of ``window_size // patch_size // merge`` merged cells a side, in raster order, the last row and
    column of windows holding what remains (no padding)."""
    v = config.vision_config
    side, merge = v.window_size // v.patch_size // v.spatial_merge_size, v.spatial_merge_size
    rows, cols = h // merge, w // merge  # the merged grid

    def spans(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return [r * c * merge**2 for r in spans(rows) for c in spans(cols)]


def vision_tower_flops(config: QwenVLConfig, h: int, w: int) -> dict[str, int]:
    """The tower on one image of h x w patches (t = 1): the Conv3d patch embedding, the blocks (q/k/v and output
    projections, ``QK^T`` and ``AV`` per attention segment, the MLP: Qwen2.5-VL's gated SwiGLU, Qwen2-VL's and
    Qwen3-VL's fc1 / fc2) and the merger (Linear(4d, 4d), GELU, Linear(4d, C) over the h * w / 4 merged tokens);
    Qwen3-VL's DeepStack mergers, each the merger's shape, apart (``deepstack_mergers``)."""
    v, p = config.vision_config, h * w
    deepstack = 0
    if isinstance(config, Qwen3VLConfig):  # full attention everywhere; a merger per DeepStack block besides
        d, out, mlp = v.hidden_size, v.out_hidden_size, 2 * 2 * p * v.hidden_size * v.intermediate_size
        segments = [[p]] * v.depth
        deepstack = len(v.deepstack_visual_indexes)
    elif isinstance(config, Qwen2_5_VLConfig):
        d, out, mlp = v.hidden_size, v.out_hidden_size, 3 * 2 * p * v.hidden_size * v.intermediate_size
        windows = window_lengths(config, h, w)
        segments = [[p] if i in v.fullatt_block_indexes else windows for i in range(v.depth)]
    else:  # Qwen2-VL: embed_dim wide, hidden_size is the decoder's width
        d, out = v.embed_dim, v.hidden_size
        mlp = 2 * 2 * p * d * int(d * v.mlp_ratio)
        segments = [[p]] * v.depth
    merged, wide = p // v.spatial_merge_size**2, d * v.spatial_merge_size**2
    kernel = v.in_channels * v.temporal_patch_size * v.patch_size**2
    attention = sum(2 * 2 * n * n * d for block in segments for n in block)  # QK^T and AV over all heads
    merger = 2 * merged * wide * wide + 2 * merged * wide * out
    parts = {
        "vision_patch_embed": 2 * p * kernel * d,
        "vision_layers": v.depth * (2 * p * d * 3 * d + 2 * p * d * d + mlp) + attention,
        "projector": merger,
    }
    return parts | ({"deepstack_mergers": deepstack * merger} if deepstack else {})


@contextmanager
def positions_on_meta(module: nn.Module) -> Iterator[None]:
    """Qwen-VL on ``meta``: positions are computed from values, which meta tensors lack, and cost no matmul. The
    tower's patch positions come from ``image_grid_thw`` on the CPU and are moved to the tower's device before
    its rotary embedding (a forward pre-hook); Qwen3-VL's tower takes them, and the taps and weights that resample
    its position grid, computed by HF's own helpers on the CPU, as the precomputed keyword arguments its forward
    accepts; the engine's M-RoPE positions (``QwenVLAdapter.position_ids``, HF's ``get_rope_index``) are replaced
    by zeros of their shape (3, B, N), as ``lvpruning.flops.measure_flops`` passes to HF's forward. HF's own
    DeepStack add (Qwen3-VL's text model, at the vision positions: a boolean index, which meta cannot size) is
    skipped: an add, no matmul (the engine's runs as it is)."""
    model = module.model if isinstance(module, LVPruningModel) else module
    qwen3 = isinstance(model.config, Qwen3VLConfig)
    if qwen3:
        hook = model.model.visual.register_forward_pre_hook(qwen3_tower_positions, with_kwargs=True)
        model.model.language_model._deepstack_process = lambda hidden, mask, features: hidden
    else:
        hook = model.model.visual.rotary_pos_emb.register_forward_pre_hook(
            lambda _, args: (args[0], args[1].to(args[0].device))  # (x, position_ids (P, 2))
        )
    if isinstance(module, LVPruningModel):
        module.adapter.position_ids = lambda ids, mask, grid: zero_positions(ids)
    try:
        yield
    finally:
        hook.remove()
        if qwen3:
            del model.model.language_model._deepstack_process  # the class's method again
        if isinstance(module, LVPruningModel):
            del module.adapter.position_ids  # the class's method again


def qwen3_tower_positions(tower: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook of Qwen3-VL's tower: its patch positions (P, 2) and position-grid taps and weights (P, 4),
    from ``grid_thw`` on the CPU with HF's own helpers, moved to the patches' device."""
    pixels, grid = args if len(args) == 2 else (args[0], kwargs.pop("grid_thw"))
    c = tower.config
    taps, weights = get_vision_interpolation_indices_and_weights(
        grid,
        num_grid_per_side=tower.num_grid_per_side,
        mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners,
        spatial_merge_size=c.spatial_merge_size,
    )
    positions = get_vision_position_ids(grid, c.spatial_merge_size)
    device = pixels.device
    kwargs |= {
        "interp_indices": taps.to(device),
        "interp_weights": weights.to(device),
        "position_ids": positions.to(device),
    }
    return (pixels, grid), kwargs


def zero_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """M-RoPE positions (3, B, N) with no meaning, for a count on ``meta``."""
    return torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
