"""LRS-VQA's image pyramid and coarse-to-fine selection against slow, literal transcriptions of the reference's
``pyramid_crop`` branch of ``process_images`` (``llava/mm_utils.py``), ``select_attention_indices_via_ratio`` and
``get_next_level_fea`` (``builder.py``): loops, the reference's ``/= 2`` halving, ``unfold`` tiling and float
scale factors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvpruning.pyramid import keep_top_share, next_level_tiles, place_tiles, pyramid_crop, pyramid_ratios

TILE, BASE = 16, 48  # the reference's 336 and 1008, scaled down by 21


def reference_pyramid(image, block_size=TILE, base_long_side=BASE):
    """The ``pyramid_crop`` branch, step by step: returns (global view, tiled levels coarsest first as
    (rows * cols, 3, tile, tile), their (resize_hw, block_num_hw))."""
    img_h, img_w = image.shape[-2:]
    min_scale = min(base_long_side / max(img_h, img_w), 1.0)
    ratios, current = [], 1.0
    while current >= min_scale:
        ratios.append(current)
        current /= 2
    if ratios[-1] > min_scale:
        ratios.append(min_scale)
    ratios.append(min(block_size / img_h, block_size / img_w))
    ratios = sorted(set(ratios), reverse=True)
    levels, infos, global_view = [], [], None
    for idx, ratio in enumerate(ratios):
        h_, w_ = round(img_h * ratio), round(img_w * ratio)
        h_block, w_block = math.ceil(h_ / block_size), math.ceil(w_ / block_size)
        scale = min(h_block * block_size / h_, w_block * block_size / w_)
        resized_h, resized_w = round(h_ * scale), round(w_ * scale)
        h_block, w_block = math.ceil(resized_h / block_size), math.ceil(resized_w / block_size)
        resized = F.interpolate(image[None], size=(resized_h, resized_w), mode="bilinear")
        if idx == len(ratios) - 1:
            global_view = torch.zeros(1, 3, block_size, block_size)
            global_view[:, :, :resized_h, :resized_w] = resized
            continue
        padded = torch.zeros(1, 3, block_size * h_block, block_size * w_block)
        padded[:, :, :resized_h, :resized_w] = resized
        patches = padded.unfold(2, block_size, block_size).unfold(3, block_size, block_size)
        levels.append(patches.permute(0, 2, 3, 1, 4, 5).contiguous().squeeze(0).flatten(0, 1))
        infos.append(((resized_h, resized_w), (h_block, w_block)))
    return global_view[0], levels[::-1], infos[::-1]


@pytest.mark.parametrize("size", [(200, 150), (70, 500), (48, 48), (30, 20), (97, 1000)])
def test_pyramid_crop_equals_the_reference_branch(size):
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(size[0]))
    global_view, tiles, levels = pyramid_crop(image, tile=TILE, base_long_side=BASE)
    want_global, want_tiles, want_infos = reference_pyramid(image)
    torch.testing.assert_close(global_view, want_global, atol=0, rtol=0)
    assert [(lv.resized, lv.blocks) for lv in levels] == want_infos
    for got, want in zip(tiles, want_tiles, strict=True):
        torch.testing.assert_close(got.flatten(0, 1), want, atol=0, rtol=0)
    assert levels[-1].ratio == 1.0 and len(tiles) == len(pyramid_ratios(*size, TILE, BASE)) - 1


def test_a_large_image_gets_a_base_level_near_1008_pixels_at_the_real_sizes():
    ratios = pyramid_ratios(4000, 6000)  # 6000 -> 3000 -> 1500 -> 1008, then the global 336 / 6000
    assert ratios == [1.0, 0.5, 0.25, 1008 / 6000, 336 / 6000]


def reference_keep(attention_scores_local, tokens_per_row, pruning_ratio, now_level_attn_mask):
    """``select_attention_indices_via_ratio``."""
    valid_indices = torch.where(now_level_attn_mask == 1)[0]
    scores = attention_scores_local[valid_indices]
    top_k = int(scores.size(0) * pruning_ratio)
    _, top_k_indices = torch.topk(scores, top_k, largest=True)
    selected = valid_indices[top_k_indices]
    newline = torch.arange(tokens_per_row - 1, attention_scores_local.size(0), tokens_per_row)
    return torch.sort(torch.cat([selected, newline]).unique())[0]


def reference_tiles(top_k_indices, now_lvl_token_num_hw, next_blocks):
    """``get_next_level_fea``'s mapping: float scale factors, unique positions, raster sort."""
    h, w = now_lvl_token_num_hw
    rows_2d, cols_2d = torch.div(top_k_indices, w, rounding_mode="floor"), torch.remainder(top_k_indices, w)
    scale_h, scale_w = next_blocks[0] / h, next_blocks[1] / w
    positions = torch.stack([torch.floor(rows_2d * scale_h).long(), torch.floor(cols_2d * scale_w).long()], dim=1)
    unique_positions, counts = torch.unique(positions, return_counts=True, dim=0)
    selected = unique_positions[counts.argsort(descending=True)[: len(counts)]]
    max_w = selected[:, 1].max() + 1
    return selected[torch.argsort(selected[:, 0] * max_w + selected[:, 1])]


@pytest.mark.parametrize("seed", range(4))
def test_keep_and_next_level_tiles_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = [(36, 55 + 1), (17, 40 + 1), (12, 12 + 1), (30, 9 + 1)][seed]  # unpadded rows x columns + newline
    next_blocks = [(6, 10), (3, 7), (2, 2), (5, 2)][seed]
    scores = torch.rand(h * w, generator=g)
    valid = torch.rand(h * w, generator=g) > 0.3 if seed % 2 else torch.ones(h * w, dtype=torch.bool)
    for share in (0.25, 0.02):
        kept = keep_top_share(scores, valid, w, share)
        assert torch.equal(kept, reference_keep(scores, w, share, valid.long()))
        tiles = next_level_tiles(kept, (h, w), next_blocks)
        assert torch.equal(tiles, reference_tiles(kept, (h, w), next_blocks))
        # The newline tokens, always kept, sit in the last column: every row of tiles has its last one taken.
        assert set(tiles[tiles[:, 1] == next_blocks[1] - 1, 0].tolist()) == set(range(next_blocks[0]))
    assert len(tiles) < next_blocks[0] * next_blocks[1] or seed == 2  # 2% of the tokens leave tiles out


def reference_place(selected_fea, selected_position, p, blocks, resize_hw, image_newline):
    """The pyramid branch of ``prune_and_construct_features``: ``index_put_`` into the padded grid, then
    ``unpad_image_hw`` on features and mask, the newline column, flattened."""
    C = selected_fea.shape[-1]
    padded = torch.zeros(blocks[0] * p, blocks[1] * p, C)
    mask = torch.zeros(blocks[0] * p, blocks[1] * p)
    local = torch.arange(p)
    gh = (selected_position[:, 0] * p).view(-1, 1, 1) + local.view(1, p, 1)
    gw = (selected_position[:, 1] * p).view(-1, 1, 1) + local.view(1, 1, p)
    gh, gw = gh.expand(-1, p, p).reshape(-1), gw.expand(-1, p, p).reshape(-1)
    padded.index_put_((gh, gw), selected_fea.flatten(0, 2))
    mask.index_put_((gh, gw), torch.ones(gh.shape[0]))

    def unpad(tensor):
        original_height, original_width = resize_hw
        current_height, current_width = tensor.shape[1:]
        if original_width / original_height > current_width / current_height:
            new_height = int(original_height * (current_width / original_width))
            return tensor[:, : current_height - (current_height - new_height), :]
        new_width = int(original_width * (current_height / original_height))
        return tensor[:, :, : current_width - (current_width - new_width)]

    fea = unpad(padded.permute(2, 0, 1))
    fea = torch.cat([fea, image_newline[:, None, None].expand(*fea.shape[:-1], 1)], dim=-1)
    m = unpad(mask[None])[0]
    m = torch.cat([m, torch.ones(m.shape[0], 1)], dim=-1)
    return fea.flatten(1, 2).transpose(0, 1), m.flatten() == 1, (fea.shape[1], fea.shape[2])


@pytest.mark.parametrize("size", [(200, 150), (70, 500), (97, 1000)])
def test_place_tiles_equals_the_reference_grid(size):
    g = torch.Generator().manual_seed(size[1])
    _, _, levels = pyramid_crop(torch.zeros(3, *size), tile=TILE, base_long_side=BASE)
    level, p, C = levels[min(1, len(levels) - 1)], 3, 5
    rows, cols = level.blocks
    cells = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    tiles = cells[torch.rand(len(cells), generator=g) < 0.5]
    features = torch.randn(len(tiles), p, p, C, generator=g)
    newline = torch.randn(C, generator=g)
    got = place_tiles(features, tiles, level, newline)
    want = reference_place(features, tiles, p, level.blocks, level.resized, newline)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    assert torch.equal(got[1], want[1]) and got[2] == want[2]
