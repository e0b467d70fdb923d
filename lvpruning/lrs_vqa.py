"""LRS-VQA's coarse-to-fine, text-guided pruning at inference (Luo et al., ICCV 2025): the Dynamic Image Pyramid
read by a trained Region Focus Module on a LLaVA-NeXT, batched, with cached generation. Our reading of the
reference: ``docs/methods.md``, "LRS-VQA".

Per sample, the image (normalised, at full resolution) is cut into its pyramid (:func:`pyramid.pyramid_crop`). The
tower encodes the global view and every tile of the coarsest tiled level, and the prompt's one image placeholder
becomes the global view's tokens followed by that level's token grid (unpadded, a newline closing each row, as
LLaVA-NeXT packs its tiles). Then, ``len(keep_ratios) - 1`` times: the module scores the grid's tokens by the last
prompt token's attention, keeps the top share and every newline, and only the tiles of the next finer level under
the kept tokens go through the tower, into that level's grid (the rest zeros, masked out). Last, the module scores
that grid and keeps the top share of its encoded tokens and every newline: the LLM reads the text, the global
view and the kept tokens in grid order, at contiguous positions (the reference re-numbers after pruning), and
generation is cached as for every other method (:func:`lvpruning.generation.generate`).

Shapes: B batch, N tokens, C hidden size, V grid tokens scored, T tiles, p tokens per tile side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, PreTrainedConfig
from transformers.utils import ModelOutput

from lvpruning.adapters import get_adapter
from lvpruning.engine import PrunedCache, decode_step
from lvpruning.flops import ImageLayout, llm_flops, vision_and_projector_flops
from lvpruning.generation import generate
from lvpruning.pyramid import (
    PyramidLevel,
    keep_top_share,
    next_level_tiles,
    place_tiles,
    pyramid_crop,
    pyramid_level,
    pyramid_ratios,
    unpadded_grid,
)
from lvpruning.region_focus import RegionFocusModule, region_focus_flops

KEEP_RATIOS = (0.25, 0.25)  # the reference's pruning_ratio at the coarsest level, then at the next (one step down)
BASE_TILES = 3  # the coarsest tiled level's long side in tiles (the reference's 1008 = 3 x 336 pixels)


@dataclass
class PyramidOutput(ModelOutput):
    """logits: of the final (pruned) prompt; cache: for :meth:`PyramidModel.decode_step`.

    tiles_encoded: (B,) tower passes per sample (the global view, the coarsest level's tiles, the tiles selected at
        each step); tiles_finest: (B,) the tiles of the finest level reached, what encoding it whole would take
        (plus the global view and the coarsest level, which it cannot skip); vision_tokens: (B,) the image's tokens
        in the LLM's prompt (global view + kept grid tokens); rounds: (B, R + 1) each prompt's length (left padding
        aside) at each of the R scoring rounds (unencoded grid tokens included: they are computed, masked), then
        the LLM's."""

    logits: torch.Tensor | None = None
    cache: PrunedCache | None = None
    tiles_encoded: torch.Tensor | None = None
    tiles_finest: torch.Tensor | None = None
    vision_tokens: torch.Tensor | None = None
    rounds: torch.Tensor | None = None


@dataclass
class _Sample:
    """One prompt on its way down the pyramid: its text, its levels and the grid it is at."""

    before: torch.Tensor  # (n_1, C) the text before the image
    after: torch.Tensor  # (n_2, C) the text after it
    global_view: torch.Tensor  # (p * p, C)
    tiles: list[torch.Tensor]  # per tiled level, coarsest first: (rows, cols, 3, t, t)
    levels: list[PyramidLevel]
    size: tuple[int, int]  # the image's (height, width)
    level: int = 0  # the level the grid belongs to
    grid: torch.Tensor | None = None  # (V_b, C) the level's tokens, newline column included
    real: torch.Tensor | None = None  # (V_b,) encoded or newline
    shape: tuple[int, int] = (0, 0)  # (h, w + 1)
    encoded: int = 0  # tower passes so far
    rounds: list[int] = field(default_factory=list)  # the prompt's length at each scoring round, then the final one

    def length(self, grid_tokens: int) -> int:
        """The prompt's length with ``grid_tokens`` of the grid."""
        return self.before.shape[0] + self.global_view.shape[0] + grid_tokens + self.after.shape[0]


class PyramidModel(nn.Module):
    """A LLaVA-NeXT ``model`` (CLIP tower, one feature layer) with a trained :class:`RegionFocusModule`, pruning
    coarse to fine over each image's pyramid (module docstring). ``base_long_side``: the coarsest tiled level's long
    side in pixels (default ``BASE_TILES`` tiles)."""

    def __init__(self, model: nn.Module, region_focus: RegionFocusModule, base_long_side: int | None = None):
        super().__init__()
        if not isinstance(model, LlavaNextForConditionalGeneration):
            raise ValueError(f"LRS-VQA's pyramid runs on LLaVA-NeXT (CLIP tiles), got {type(model).__name__}")
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"one vision_feature_layer is supported, got {config.vision_feature_layer!r}")
        self.model = model.eval()
        self.adapter = get_adapter(model)
        self.region_focus = region_focus.eval()
        self.tile = config.vision_config.image_size
        self.side = self.tile // config.vision_config.patch_size  # p
        self.base_long_side = base_long_side or BASE_TILES * self.tile
        self.train(False)

    def train(self, mode: bool = True) -> PyramidModel:
        """Inference only: the module trains on the whole prompt (``train.stage: region_focus``)."""
        if mode:
            raise ValueError("PyramidModel runs inference only; train its module with train.stage: region_focus")
        return super().train(False)

    # ------------------------------------------------------------------ the tower

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles (T, 3, t, t) through the tower, LLaVA-NeXT's feature selection and projector: (T, p, p, C), as
        ``get_image_features`` computes each tile before packing."""
        config = self.model.config
        out = self.model.model.vision_tower(tiles, output_hidden_states=True)
        features = out.hidden_states[config.vision_feature_layer]  # (T, 1 + p * p, C_v)
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # CLS dropped
        return self.model.model.multi_modal_projector(features).unflatten(1, (self.side, self.side))

    def _encode_all(self, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every sample's tiles (T_b, 3, t, t) in one tower pass: per sample (T_b, p, p, C)."""
        dtype = next(self.model.parameters()).dtype
        features = self.encode(torch.cat(tiles).to(dtype))
        return list(features.split([t.shape[0] for t in tiles]))

    # ------------------------------------------------------------------ the prompt

    def _samples(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, image_sizes
    ) -> list[_Sample]:
        """Each prompt's text around its one image placeholder, and its image's pyramid (fp32 resizing)."""
        image_token = self.model.config.image_token_id
        samples = []
        for ids, mask, pixels, (height, width) in zip(input_ids, attention_mask, pixel_values, image_sizes.tolist()):
            ids = ids[mask.bool()]
            at = (ids == image_token).nonzero()[:, 0]
            if at.numel() != 1:
                raise ValueError(
                    f"each prompt needs exactly one image placeholder (unexpanded: the pyramid sets the image's "
                    f"tokens), found {at.numel()}"
                )
            text = self.adapter.embed_tokens(ids)  # (n, C)
            image = pixels[:, :height, :width].float()
            global_view, tiles, levels = pyramid_crop(image, self.tile, self.base_long_side)
            samples.append(_Sample(text[: int(at)], text[int(at) + 1 :], global_view, tiles, levels, (height, width)))
        views = self._encode_all([s.global_view[None] for s in samples] + [s.tiles[0].flatten(0, 1) for s in samples])
        newline = self.model.model.image_newline
        for s, view, coarse in zip(samples, views[: len(samples)], views[len(samples) :], strict=True):
            s.global_view = view.flatten(0, 2)  # (p * p, C)
            rows, cols = s.levels[0].blocks
            every = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))  # (rows * cols, 2) raster order
            s.grid, s.real, s.shape = place_tiles(coarse, every, s.levels[0], newline, s.size)  # the image's aspect
            s.encoded = 1 + rows * cols
        return samples

    def _batch(
        self, samples: list[_Sample], kept: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts left-padded into one batch: text, global view, then the grid (``kept`` is None) or its
        ``kept`` tokens. Returns embeddings (B, N, C), which tokens attend and are attended (B, N) (not padding,
        not an unencoded grid token), positions (B, N) (contiguous over everything but the left padding), and the
        grid's positions (B, V), which are real (B, V) and how many each sample has (B,)."""
        parts, real = [], []
        for b, s in enumerate(samples):
            grid, grid_real = (s.grid, s.real) if kept is None else (s.grid[kept[b]], s.real[kept[b]])
            parts.append((s.before, s.global_view, grid, s.after))
            real.append(grid_real)
        lengths = [sum(p.shape[0] for p in part) for part in parts]
        B, N, V = len(parts), max(lengths), max(r.shape[0] for r in real)
        first = parts[0][0]
        embeds = first.new_zeros(B, N, first.shape[-1])
        present = torch.zeros(B, N, dtype=torch.bool, device=first.device)
        attend = torch.zeros_like(present)
        vision_pos = torch.zeros(B, V, dtype=torch.long, device=first.device)
        vision_valid = torch.zeros(B, V, dtype=torch.bool, device=first.device)
        for b, ((before, view, grid, after), grid_real) in enumerate(zip(parts, real, strict=True)):
            start = N - lengths[b]
            embeds[b, start:] = torch.cat([before, view, grid.to(before.dtype), after])
            present[b, start:] = True
            attend[b, start:] = True
            grid_start = start + before.shape[0] + view.shape[0]
            attend[b, grid_start : grid_start + grid.shape[0]] = grid_real
            vision_pos[b, : grid.shape[0]] = torch.arange(grid_start, grid_start + grid.shape[0])
            vision_valid[b, : grid.shape[0]] = grid_real
        position_ids = (present.long().cumsum(-1) - 1).clamp_min(0)
        counts = torch.tensor([r.shape[0] for r in real])
        return embeds, attend, position_ids, vision_pos, vision_valid, counts

    def select(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        image_sizes: torch.Tensor,
        keep_ratios: Sequence[float] = KEEP_RATIOS,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[_Sample]]:
        """Down the pyramid: the LLM's prompt (embeddings (B, N, C), padding (B, N), positions (B, N)) and the
        samples as they ended (tiles encoded, the level reached)."""
        if not keep_ratios or not all(0.0 < r <= 1.0 for r in keep_ratios):
            raise ValueError(f"keep_ratios: one share in (0, 1] per scoring round, got {list(keep_ratios)}")
        samples = self._samples(input_ids, attention_mask, pixel_values, image_sizes)
        newline = self.model.model.image_newline
        for step, share in enumerate(keep_ratios):
            embeds, attend, position_ids, vision_pos, vision_valid, counts = self._batch(samples)
            for s, n in zip(samples, counts.tolist(), strict=True):
                s.rounds.append(s.length(n))
            last = torch.full((len(samples),), embeds.shape[1] - 1, device=embeds.device)  # the last prompt token
            scores = self.region_focus.score(embeds, position_ids, attend, last, vision_pos, vision_valid)  # (B, V)
            kept = [
                keep_top_share(scores[b, :n], s.real, s.shape[1], share)
                for b, (s, n) in enumerate(zip(samples, counts.tolist(), strict=True))
            ]
            if step == len(keep_ratios) - 1:
                for s, k in zip(samples, kept, strict=True):
                    s.rounds.append(s.length(k.shape[0]))
                embeds, padding, position_ids, *_ = self._batch(samples, kept)
                return embeds, padding, position_ids, samples
            chosen = []
            for s, k in zip(samples, kept, strict=True):
                s.level = min(s.level + 1, len(s.levels) - 1)  # one tiled level: its own tiles again (as the reference)
                chosen.append(next_level_tiles(k, s.shape, s.levels[s.level].blocks))
            features = self._encode_all([s.tiles[s.level][t[:, 0], t[:, 1]] for s, t in zip(samples, chosen)])
            for s, t, f in zip(samples, chosen, features, strict=True):
                s.grid, s.real, s.shape = place_tiles(f, t, s.levels[s.level], newline)
                s.encoded += t.shape[0]
        raise AssertionError("the last round returns")

    # ------------------------------------------------------------------ the LLM

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        keep_ratios: Sequence[float] | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_grid_thw: torch.Tensor | None = None,
        policy: None = None,
        layers: None = None,
    ) -> PyramidOutput:
        """The pyramid's prefill. ``input_ids`` (B, N) left-padded prompts with one unexpanded image placeholder
        each; ``pixel_values`` (B, 3, H, W) the images normalised as the model's processor does, each top-left
        at its ``image_sizes`` (B, 2) (height, width) and zero beyond; ``keep_ratios``: the share kept at each
        scoring round, coarsest first (default ``KEEP_RATIOS``: one step down, as the reference). ``image_grid_thw``,
        ``policy`` and ``layers`` (what :func:`generate` passes every pruner) must be None."""
        if image_grid_thw is not None or policy is not None or layers is not None:
            raise ValueError("the pyramid takes no image_grid_thw, policy or layers: its Region Focus Module ranks")
        if image_sizes is None:
            raise ValueError("the pyramid needs image_sizes (B, 2): each image's height and width in pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, padding, position_ids, samples = self.select(
            input_ids, pixel_values, attention_mask, image_sizes, tuple(keep_ratios or KEEP_RATIOS)
        )
        cache = PrunedCache(config=self.adapter.text_config) if use_cache else None
        mask = self.adapter.attention_mask(padding, padding.shape[1], embeds.dtype)
        rope = self.adapter.rotary(embeds, position_ids)
        hidden = embeds
        for layer in self.adapter.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=rope,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
            )
        if cache is not None:
            cache.paddings, cache.position_ids, cache.stage_layers = [padding], position_ids[:, -1:], ()
        finest = [s.levels[s.level].blocks for s in samples]
        return PyramidOutput(
            logits=self.adapter.logits(hidden[:, -logits_to_keep:]),
            cache=cache,
            tiles_encoded=torch.tensor([s.encoded for s in samples]),
            tiles_finest=torch.tensor([r * c for r, c in finest]),
            vision_tokens=torch.tensor([s.rounds[-1] - len(s.before) - len(s.after) for s in samples]),
            rounds=torch.tensor([s.rounds for s in samples]),
        )

    def decode_step(self, input_ids: torch.Tensor, cache: PrunedCache) -> torch.Tensor:
        """One cached decoding step after the pyramid's prefill: (B, 1) -> logits (B, 1, vocab)."""
        return decode_step(self.adapter, input_ids, cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Greedy (default) or sampled decoding; see :func:`lvpruning.generation.generate` for the arguments."""
        return generate(self, input_ids, pixel_values, **kwargs)


def pyramid_flops(
    config: PreTrainedConfig,
    module_layers: int,
    rounds: Sequence[int],
    tiles_encoded: int,
    lm_head_positions: str = "all",
) -> dict[str, int]:
    """Matmul FLOPs of one prompt through :class:`PyramidModel` (what FlopCounterMode counts of its forward): the
    tower and projector once per tile encoded, the Region Focus Module (``module_layers`` layers and one logit row)
    at each scoring round over the prompt's length then, and the LLM over the final prompt, ``rounds`` as
    :attr:`PyramidOutput.rounds` gives them (the last is the LLM's)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    layout = ImageLayout((vision.image_size,) * 2, vision.image_size, (0, 0), tiles_encoded, side * side, 0)
    parts, _ = vision_and_projector_flops(config, layout)
    *scored, final = rounds
    text = config.text_config
    parts["region_focus"] = sum(region_focus_flops(text, module_layers, n) for n in scored)
    return parts | llm_flops(text, [final] * text.num_hidden_layers, lm_head_positions)


@dataclass(frozen=True)
class PyramidBound:
    """The most one prompt can cost the pyramid (:func:`pyramid_bound`), and the same finest level unpruned."""

    rounds: tuple[int, ...]  # as PyramidOutput.rounds: each scoring round's prompt length, then the LLM's
    tiles: int  # tower passes: the global view and every tile of each level visited
    whole_length: int  # the prompt with the finest level visited whole: global view, its whole grid, text
    whole_tiles: int  # the global view and that level's tiles


def pyramid_bound(
    config: PreTrainedConfig,
    image_size: Sequence[int],
    num_text: int,
    keep_ratios: Sequence[float] = KEEP_RATIOS,
    base_long_side: int | None = None,
) -> PyramidBound:
    """The most one prompt of ``num_text`` text tokens and one ``image_size`` (H, W) image can cost the pyramid,
    from the geometry alone: every tile of each level visited selected, no newline among the last round's top
    share (which tiles a prompt selects depends on the image and the question: :attr:`PyramidOutput.rounds`)."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    height, width = (int(x) for x in image_size)
    ratios = pyramid_ratios(height, width, tile, base_long_side or BASE_TILES * tile)[:-1]  # the global view last
    levels = [pyramid_level(height, width, r, tile) for r in reversed(ratios)]  # coarsest first
    rounds, tiles = [], 1
    for step in range(len(keep_ratios)):
        level = levels[min(step, len(levels) - 1)]
        aspect = (height, width) if step == 0 else level.resized  # as place_tiles cuts each round's grid
        h, w = unpadded_grid((level.blocks[0] * side, level.blocks[1] * side), aspect)
        rounds.append(num_text + side * side + h * (w + 1))
        tiles += level.blocks[0] * level.blocks[1]
    kept = int(h * (w + 1) * keep_ratios[-1]) + h
    whole_tiles = 1 + level.blocks[0] * level.blocks[1]
    return PyramidBound((*rounds, num_text + side * side + kept), tiles, rounds[-1], whole_tiles)
