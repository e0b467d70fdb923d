"""LRS-VQA's coarse-to-fine inference (``lvpruning.lrs_vqa.PyramidModel``) on a tiny LLaVA-NeXT with a Qwen2 decoder,
against the reference's path written out per sample: one tile at a time through Hugging Face's tower and projector,
the reference's selection and placement loops (``test_pyramid``'s transcriptions), and Hugging Face's own forward
and ``generate`` on the pruned prompt's embeddings (contiguous positions, as the reference re-numbers them)."""

from __future__ import annotations

import json

import pytest
import torch

from lvpruning.flops import count_flops
from lvpruning.flops_cli import main as flops_main
from lvpruning.lrs_vqa import PyramidModel, pyramid_bound, pyramid_flops
from lvpruning.region_focus import RegionFocusModule
from lvpruning.tiny import tiny_llava, tiny_tiled_config
from tests.lvpruning.test_pyramid import BASE, TILE, reference_keep, reference_place, reference_pyramid, reference_tiles

# 3, 2, 3, 1 and 2 tiled levels; the last's coarsest grid is one column narrower cut to the image's aspect than to
# its level's resized pixels (the reference cuts it to the image's)
SIZES = [(40, 100), (64, 64), (100, 30), (20, 20), (20, 59)]
PROMPTS = [(3, 9), (6, 2), (1, 12), (4, 4), (2, 5)]  # text tokens before and after the image


def tiny_next(dtype=torch.float32, seed: int = 5):
    config = tiny_tiled_config("llava_next", "qwen2", tile_size=TILE, num_layers=4, initializer_range=0.1)
    model = tiny_llava(config, seed=seed).to(dtype).eval()
    torch.manual_seed(seed)
    focus = RegionFocusModule(model, (2, 3))
    for p in focus.parameters():  # a trained module differs from the LLM's layers it was copied from
        p.data.add_(torch.randn_like(p) * 0.05)
    return model, focus


def batch(model, seed: int = 0):
    """Left-padded prompts with one image placeholder each, and the images top-left in one zero tensor."""
    g = torch.Generator().manual_seed(seed)
    image_token, pad = model.config.image_token_id, model.config.text_config.pad_token_id
    prompts = [
        torch.cat(
            [
                torch.randint(10, 120, (a,), generator=g),
                torch.tensor([image_token]),
                torch.randint(10, 120, (b,), generator=g),
            ]
        )
        for a, b in PROMPTS
    ]
    N = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), N), pad)
    attention_mask = torch.zeros(len(prompts), N, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, N - len(p) :], attention_mask[b, N - len(p) :] = p, 1
    images = [torch.randn(3, h, w, generator=g) for h, w in SIZES]
    pixel_values = torch.zeros(len(images), 3, max(h for h, _ in SIZES), max(w for _, w in SIZES))
    for b, image in enumerate(images):
        pixel_values[b, :, : image.shape[1], : image.shape[2]] = image
    return prompts, images, input_ids, attention_mask, pixel_values, torch.tensor(SIZES)


def reference_prompt(model, focus, prompt, image, ratios):
    """One sample down the pyramid the reference's way: the pruned prompt's embeddings (n, C) and the tower passes."""
    dtype = next(model.parameters()).dtype
    cfg = model.config

    def encode(tile):  # one tile: HF's tower, the feature layer without CLS, the projector -> (p, p, C)
        hidden = model.model.vision_tower(tile[None].to(dtype), output_hidden_states=True).hidden_states
        features = model.model.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])[0]
        return features.view(TILE // 4, TILE // 4, -1)

    at = int((prompt == cfg.image_token_id).nonzero()[0, 0])
    text = model.get_input_embeddings()(prompt)
    before, after = text[:at], text[at + 1 :]
    global_view, tiles, infos = reference_pyramid(image.float())
    glob = encode(global_view).flatten(0, 1)
    newline = model.model.image_newline
    (resized, blocks), level = infos[0], 0
    every = torch.tensor([(r, c) for r in range(blocks[0]) for c in range(blocks[1])])
    features = torch.stack([encode(t) for t in tiles[0]])
    original = tuple(image.shape[1:])  # unpad_image(..., image.size) at the coarsest level
    grid, real, (h, w) = reference_place(features.float(), every, TILE // 4, blocks, original, newline.float())
    passes = 1 + len(tiles[0])
    for step, share in enumerate(ratios):
        seq = torch.cat([before, glob, grid.to(dtype), after])
        N, start = seq.shape[0], before.shape[0] + glob.shape[0]
        attend = torch.ones(N, dtype=torch.bool)
        attend[start : start + grid.shape[0]] = real
        vision_pos = torch.arange(start, start + grid.shape[0])
        scores = focus.score(
            seq[None], torch.arange(N)[None], attend[None], torch.tensor([N - 1]), vision_pos[None], real[None]
        )[0]
        kept = reference_keep(scores, w, share, real.long())
        if step == len(ratios) - 1:
            return torch.cat([before, glob, grid[kept].to(dtype), after]), passes
        level = min(level + 1, len(infos) - 1)
        (resized, blocks) = infos[level]
        chosen = reference_tiles(kept, (h, w), blocks)
        features = torch.stack([encode(tiles[level][r * blocks[1] + c]) for r, c in chosen.tolist()])
        grid, real, (h, w) = reference_place(features.float(), chosen, TILE // 4, blocks, resized, newline.float())
        passes += len(chosen)
    raise AssertionError


@pytest.mark.parametrize("ratios", [(0.25, 0.25), (0.5, 0.3, 0.2), (0.4,)])
def test_batched_pyramid_equals_the_reference_per_sample(ratios):
    model, focus = tiny_next()
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    prompts, images, input_ids, attention_mask, pixel_values, sizes = batch(model)
    with torch.no_grad():
        out = pyramid(input_ids, pixel_values, attention_mask, sizes, keep_ratios=ratios, logits_to_keep=1)
        tokens = pyramid.generate(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            image_sizes=sizes,
            keep_ratios=ratios,
            max_new_tokens=6,
            eos_token_id=[],
        )
        for b, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            embeds, passes = reference_prompt(model, focus, prompt, image, ratios)
            logits = model(inputs_embeds=embeds[None]).logits[0, -1]  # HF's forward: positions 0..n-1
            torch.testing.assert_close(out.logits[b, -1], logits, atol=2e-5, rtol=1e-4)
            assert int(out.tiles_encoded[b]) == passes
            assert int(out.vision_tokens[b]) == embeds.shape[0] - len(prompt) + 1
            hf = model.generate(inputs_embeds=embeds[None], max_new_tokens=6, do_sample=False, eos_token_id=None)
            assert tokens[b, input_ids.shape[1] :].tolist() == hf[0].tolist()  # cached decoding = HF's


def test_the_pyramid_encodes_fewer_tiles_than_the_finest_level_holds():
    model, focus = tiny_next()
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 64, 256, generator=g)  # levels: 1 x 3 tiles (the base), 1 x 4, 2 x 8, 4 x 16
    ids = torch.tensor([[11, 12, model.config.image_token_id, 13, 14, 15]])
    with torch.no_grad():
        out = pyramid(ids, image, image_sizes=torch.tensor([[64, 256]]), keep_ratios=(0.1, 0.1, 0.25))
    assert int(out.tiles_finest[0]) == 2 * 8  # two steps down: the 0.5 level
    every = 1 + 3 + 4 + 16  # the global view and each level's tiles on the way, all encoded
    assert 1 + 3 + 2 <= int(out.tiles_encoded[0]) < every - 8, out.tiles_encoded


def test_bf16_pyramid_is_close_to_fp32_and_runs_batched():
    model, focus = tiny_next(torch.bfloat16)
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    prompts, images, input_ids, attention_mask, pixel_values, sizes = batch(model)
    with torch.no_grad():
        out = pyramid(input_ids, pixel_values, attention_mask, sizes, logits_to_keep=1)
        for b, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            embeds, _ = reference_prompt(model, focus, prompt, image, (0.25, 0.25))
            want = model(inputs_embeds=embeds[None]).logits[0, -1]
            assert out.logits.dtype == torch.bfloat16 and bool(out.logits.isfinite().all())
            torch.testing.assert_close(out.logits[b, -1].float(), want.float(), atol=0.05, rtol=0.05)


def test_measured_flops_equal_the_analytic_count():
    model, focus = tiny_next()
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    prompts, images, *_ = batch(model)
    for prompt, image in zip(prompts[:2], images[:2], strict=True):
        inputs = {
            "input_ids": prompt[None],
            "pixel_values": image[None],
            "image_sizes": torch.tensor([image.shape[1:]]),
            "keep_ratios": (0.25, 0.25),
        }
        measured = count_flops(pyramid, inputs)
        with torch.no_grad():
            out = pyramid(**inputs)
        analytic = pyramid_flops(model.config, len(focus.llm_layers), out.rounds[0], int(out.tiles_encoded[0]))
        assert sum(analytic.values()) == measured, analytic


def test_bad_inputs_are_named():
    model, focus = tiny_next()
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    image = torch.zeros(1, 3, 20, 20)
    two = torch.tensor([[11, model.config.image_token_id, model.config.image_token_id, 12]])
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        pyramid(two, image, image_sizes=torch.tensor([[20, 20]]))
    with pytest.raises(ValueError, match="keep_ratios"):
        pyramid(two[:, :2], image, image_sizes=torch.tensor([[20, 20]]), keep_ratios=(0.0,))
    with pytest.raises(ValueError, match="policy or layers"):
        pyramid(two[:, :2], image, image_sizes=torch.tensor([[20, 20]]), layers=(1,))
    llava = tiny_llava()
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        PyramidModel(llava, focus)


@pytest.mark.parametrize("size", [(40, 100), (64, 64), (20, 20)])
def test_the_bound_is_what_a_prompt_costs_when_every_tile_is_selected(size):
    model, focus = tiny_next()
    pyramid = PyramidModel(model, focus, base_long_side=BASE)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[11, 12, model.config.image_token_id, 13, 14, 15]])
    with torch.no_grad():  # all of the first level kept: every tile of the next one selected
        out = pyramid(ids, image, image_sizes=torch.tensor([size]), keep_ratios=(1.0, 0.25))
    bound = pyramid_bound(model.config, size, num_text=5, keep_ratios=(1.0, 0.25), base_long_side=BASE)
    assert out.rounds[0, :-1].tolist() == list(bound.rounds[:-1]) and int(out.tiles_encoded[0]) == bound.tiles
    assert out.rounds[0, -1] <= bound.rounds[-1] and bound.whole_length == bound.rounds[-2]


def test_flops_cli_reports_the_pyramid(capsys):
    assert (
        flops_main(["--model", "llava-next-7b", "--method", "lrs_vqa", "--image-size", "2000", "3000", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert rows["lrs_vqa_upper_bound"]["tiles"] == 1 + 2 * 3 + 3 * 5  # global view, the 1008-px level, the next
    assert rows["lrs_vqa_upper_bound"]["tflops"] < rows["pyramid_level_whole"]["tflops"]
    assert rows["llava_next_anyres"]["tiles"] == 1 + 2 * 2  # llava-v1.6-7b's grid pinpoints: 2 x 2 tiles at most here
