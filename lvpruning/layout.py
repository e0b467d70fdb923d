"""Vision tokens per sample: where each vision token comes from (``VisionLayout``), and the batch layout that gives
every sample the same number of vision slots (``equalize_vision``).

High-resolution families (LLaVA-NeXT, LLaVA-OneVision) give an image a number of vision tokens that depends on its
size: the base view, then the tile grid with its letterbox rows or columns removed (from ``image_sizes``) and one
``image_newline`` token after every grid row. The engine keeps static shapes by giving every sample ``Nv`` vision
slots (the batch's largest count): a sample with fewer vision tokens gets empty slots right after its last vision
token, marked padding, so attention never sees them and positions are unchanged.

Shapes: B batch, N0 prompt tokens, Nv vision slots per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import LlavaNextConfig, PreTrainedConfig
from transformers.models.llava_next import modeling_llava_next
from transformers.models.llava_onevision import modeling_llava_onevision

BASE, TILE, NEWLINE, EMPTY = 0, 1, 2, -1  # VisionLayout.kind


@dataclass(frozen=True)
class VisionLayout:
    """Per vision slot (B, Nv), indexed like ``StageInput.vision_index``: ``kind`` is ``BASE`` (the downscaled base
    view, or LLaVA-1.5's only view), ``TILE`` (a full-resolution tile), ``NEWLINE`` (the learned token closing a grid
    row) or ``EMPTY`` (a slot beyond the sample's own count); ``tile`` the tile's index in the grid, raster order
    (-1 elsewhere); ``row``/``col`` the token's cell: in the base view's grid for ``BASE``, in the full-resolution
    grid of all tiles (before the letterbox rows or columns are removed) for ``TILE``, and for ``NEWLINE`` the row
    it closes and one past that row's last column."""

    kind: torch.Tensor
    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def gather(self, index: torch.Tensor) -> VisionLayout:
        """The layout of the vision tokens ``index`` (B, V) (e.g. ``StageInput.vision_index``)."""
        return VisionLayout(*(t.gather(1, index) for t in (self.kind, self.tile, self.row, self.col)))

    def to(self, device: torch.device | str) -> VisionLayout:
        return VisionLayout(*(t.to(device) for t in (self.kind, self.tile, self.row, self.col)))

    @staticmethod
    def stack(rows: list[torch.Tensor], num_slots: int) -> VisionLayout:
        """One layout from per-sample (n_b, 4) rows of (kind, tile, row, col), ``EMPTY`` beyond each n_b."""
        out = torch.full((len(rows), num_slots, 4), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : row.shape[0]] = row.long()
        return VisionLayout(*out.unbind(-1))


def tower_tokens(layout: VisionLayout, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vision token's tower pass and tower token, same shape as ``layout``, -1 where it has none (newline,
    empty), for a CLIP tower of ``side x side`` patches per pass with CLS first: the base view's (row, col) is pass 0,
    token 1 + row * side + col; tile t's is pass 1 + t, token 1 + (row % side) * side + col % side."""
    base, tile = (layout.kind == BASE) & (layout.row >= 0), layout.kind == TILE  # not a kept CLS token
    token = 1 + (layout.row % side) * side + layout.col % side
    none = torch.full_like(token, -1)
    tower_pass = torch.where(base, 0, torch.where(tile, 1 + layout.tile, none))
    return tower_pass, torch.where(base | tile, token, none)


def packed_cells(config: PreTrainedConfig, image_size: list[int]) -> torch.Tensor:
    """(n, 4) rows of (kind, tile, row, col), :class:`VisionLayout`'s fields, for the n vision tokens of one image of
    ``image_size`` (H, W) on a LLaVA-NeXT or LLaVA-OneVision ``config``: Hugging Face's own ``pack_image_features``
    (base view, tile grid, letterbox removal, OneVision's downscaling of large grids, newlines) run on a map of cell
    coordinates in place of features, so the layout follows whatever HF's packing does."""
    v, pinpoints = config.vision_config, config.image_grid_pinpoints
    side = v.image_size // v.patch_size
    hf = modeling_llava_next if isinstance(config, LlavaNextConfig) else modeling_llava_onevision
    tiles = hf.image_size_to_num_patches(image_size, pinpoints, v.image_size) - 1
    _, grid_width = hf.get_anyres_image_grid_shape(image_size, pinpoints, v.image_size)
    cell = torch.arange(side * side)
    base = torch.stack([torch.full_like(cell, BASE), cell // side, cell % side], dim=1)  # (side^2, 3)
    tile = torch.arange(tiles)[:, None]  # (tiles, 1)
    row, col = (tile // grid_width) * side + cell // side, (tile % grid_width) * side + cell % side  # full grid
    tiled = torch.stack([torch.full((tiles, side * side), TILE), row, col], dim=-1)
    cells = [torch.cat([base[None], tiled]).float()]  # (1 + tiles, side^2, 3)
    owner, newline = SimpleNamespace(config=config), torch.tensor([NEWLINE, -1.0, -1.0])  # packing reads only config
    if isinstance(config, LlavaNextConfig):
        packed, _ = hf.LlavaNextModel.pack_image_features(
            owner, cells, [image_size], config.vision_feature_select_strategy, image_newline=newline
        )
    else:
        packed, _ = hf.LlavaOnevisionModel.pack_image_features(
            owner, cells, [image_size], image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio
        )
    kind, row, col = packed[0].round().long().unbind(-1)  # (n,) each
    closes = kind == NEWLINE  # a newline closes the row of the token before it
    row = torch.where(closes, row.roll(1), row)
    col = torch.where(closes, col.roll(1) + 1, col)
    tile_of = torch.where(kind == TILE, (row // side) * grid_width + col // side, -1)
    return torch.stack([kind, tile_of, row, col], dim=1)


def base_grid_layout(num_samples: int, side: int, num_tokens: int) -> VisionLayout:
    """LLaVA-1.5's layout: one ``side x side`` base view per sample, in raster order, after the tower's extra
    tokens where the feature selection keeps them (``full``: the CLS token first, row and column -1)."""
    extra = num_tokens - side * side
    cells = torch.arange(-extra, side * side)
    grid = torch.stack([cells // side, cells % side], dim=1).masked_fill(cells[:, None] < 0, -1)
    row = torch.cat([torch.zeros_like(grid[:, :1]), torch.full_like(grid[:, :1], -1), grid], dim=1)
    return VisionLayout.stack([row] * num_samples, num_tokens)


def equalize_vision(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    vision: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    instruction: torch.Tensor | None,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Give every sample ``max(counts)`` vision slots: ``Nv - n_b`` empty ones (vision, padding, no label) right after
    sample b's last vision token, the rows then padded to one length (on the left where a row ends on a real token,
    as generation needs, else on the right). Returns ``input_ids, embeds, vision, attention_mask, labels,
    instruction`` in the new layout (``labels``/``instruction`` ``None`` when given ``None``)."""
    B, N = input_ids.shape
    extra = (counts.max() - counts).tolist()
    length = N + max(extra)
    source = torch.full((B, length), -1, dtype=torch.long)  # new column -> old column, -1: an empty slot or padding
    empty = torch.zeros(B, length, dtype=torch.bool)
    for b in range(B):
        last = int(torch.nonzero(vision[b])[-1])
        row = torch.cat([torch.arange(last + 1), torch.full((extra[b],), -1), torch.arange(last + 1, N)])
        shift = length - row.shape[0] if bool(attention_mask[b, -1]) else 0
        source[b, shift : shift + row.shape[0]] = row
        empty[b, shift + last + 1 : shift + last + 1 + extra[b]] = True
    source, empty = source.to(input_ids.device), empty.to(input_ids.device)
    taken = source.clamp_min(0)
    real = source >= 0

    def move(t: torch.Tensor, fill) -> torch.Tensor:
        moved = t.gather(1, taken if t.dim() == 2 else taken[..., None].expand(-1, -1, t.shape[-1]))
        where = real if t.dim() == 2 else real[..., None]
        return torch.where(where, moved, torch.as_tensor(fill, dtype=t.dtype, device=t.device))

    image_token = input_ids[vision][0]
    input_ids = torch.where(empty, image_token, move(input_ids, 0))
    return (
        input_ids,
        move(embeds, 0.0),
        move(vision, False) | empty,
        move(attention_mask, 0),
        None if labels is None else move(labels, -100),
        None if instruction is None else move(instruction, False),
    )
