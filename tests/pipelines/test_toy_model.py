"""The toy LLaVA and its processor: every toy word is in the vocabulary; saved, they reload by path."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipelines.toy.formats import PROMPT_SUFFIX
from pipelines.toy.model import (
    TOY_MODEL,
    VISION_POSITION_STD,
    build_toy_model,
    save_toy_model,
    sincos_2d,
    toy_config,
    toy_processor,
    vision_position_embeddings,
)
from pipelines.toy.scenes import SceneSpec, make_split, render, toy_words

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def processor():
    return toy_processor()


def prompts_and_images(n: int = 4) -> tuple[list[str], list[Image.Image]]:
    spec = SceneSpec()
    split = make_split(seed=0, n_questions=n, spec=spec, split="test")
    image = Image.fromarray(render(split[0][0], spec))
    prompts = [f"{SYSTEM} USER: <image>\n{q.text}{PROMPT_SUFFIX} ASSISTANT: {q.answer}</s>" for q in split[0][1]]
    return prompts, [image] * len(prompts)


def test_every_toy_word_is_one_known_token(processor):
    tokenizer = processor.tokenizer
    for word in toy_words():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    assert len(tokenizer) <= toy_config().text_config.vocab_size


def test_every_question_prompt_tokenizes_without_unk(processor):
    spec = SceneSpec(question_types=("color", "shape", "exist", "position", "size"))
    texts = {q.text for _, qs in make_split(seed=0, n_questions=2_000, spec=spec, split="train") for q in qs}
    tokenizer = processor.tokenizer
    for text in [SYSTEM, PROMPT_SUFFIX, *texts]:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    for answer in ("Red", "Circle", "Yes", "No", "Large"):  # one word = one token, then </s>
        ids = tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        assert len(ids) == 2 and ids[1] == tokenizer.eos_token_id


def test_toy_model_shape(processor):
    config = toy_config()
    assert config.image_seq_length == 64 and config.vision_config.image_size == SceneSpec().image_size
    assert config.text_config.num_hidden_layers >= 4  # room for pruning stages after layers 0, 1, 2
    prompts, images = prompts_and_images()
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (batch["input_ids"] == config.image_token_id).sum(1).tolist() == [64] * len(prompts)
    model = build_toy_model(config)
    assert sum(p.numel() for p in model.parameters()) * 4 < 8 * 2**20  # fp32 weights of a few MB at most


def test_unknown_model_key_fails_with_its_name():
    with pytest.raises(ValueError, match="hiden_size"):
        toy_config(hiden_size=32)
    assert toy_config(num_layers=6).text_config.num_hidden_layers == 6
    assert set(TOY_MODEL) >= {"hidden_size", "num_layers", "vision_hidden", "vision_layers"}


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_the_llama_and_projector_init(std):
    model = build_toy_model(toy_config(initializer_range=std))
    for weight in (
        model.model.multi_modal_projector.linear_1.weight,
        model.model.language_model.embed_tokens.weight,
        model.model.language_model.layers[0].self_attn.q_proj.weight,
        model.model.language_model.layers[-1].mlp.down_proj.weight,
    ):
        assert weight.std().item() == pytest.approx(std, rel=0.1)
    clip_own = build_toy_model(vision_position_std=None)
    assert vision_position_embeddings(clip_own).std().item() == pytest.approx(0.02, rel=0.1)  # CLIP's own init


@pytest.mark.parametrize("grid, width", [(8, 64), (6, 16), (3, 8)])
def test_sincos_2d_matches_a_written_out_table(grid, width):
    table = sincos_2d(grid, width)
    assert table.shape == (grid * grid, width)
    quarter = width // 4
    for r in range(grid):
        for c in range(grid):
            row = []
            for position in (r, c):
                for fn in (math.sin, math.cos):
                    row += [fn(position / 10000 ** (i / quarter)) for i in range(quarter)]
            torch.testing.assert_close(table[r * grid + c], torch.tensor(row, dtype=torch.float32))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(grid, 10)


def test_vision_positions_start_as_the_scaled_sincos_table():
    weight = vision_position_embeddings(build_toy_model()).detach()  # (1 + 64, 64): CLS first
    assert torch.equal(weight[0], torch.zeros_like(weight[0]))
    assert weight[1:].std().item() == pytest.approx(VISION_POSITION_STD, rel=1e-3)
    table = sincos_2d(8, weight.shape[1])
    torch.testing.assert_close(weight[1:], table * (weight[1:].norm() / table.norm()))
    # Rows are ordered along the slowest sine of the row half (channel 0 is the fastest, 1 radian per row).
    slow = weight[1:, weight.shape[1] // 4 - 1].view(8, 8)[:, 0]
    assert torch.all(slow[1:] > slow[:-1])


def test_saved_model_and_processor_reload_by_path(processor, tmp_path):
    model = build_toy_model(seed=1)
    path = save_toy_model(tmp_path / "toy-llava", model, processor)
    reloaded = LlavaForConditionalGeneration.from_pretrained(path).eval()
    reprocessor = AutoProcessor.from_pretrained(path)
    assert type(reprocessor).__name__ == "LlavaProcessor"

    prompts, images = prompts_and_images()
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    rebatch = reprocessor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert batch.keys() == rebatch.keys()
    assert all(torch.equal(batch[k], rebatch[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**rebatch).logits, model(**batch).logits)
