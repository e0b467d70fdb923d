"""Training data for the tiled families (LLaVA-NeXT): prompts from the processor's chat template, answers masked,
images of different sizes encoded into different numbers of tiles and vision tokens, padded into one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lvpruning import PruningConfig, attach
from lvpruning.tiny import (
    TINY_CHAT_TEMPLATE,
    build_processor,
    tiny_llava,
    tiny_llava_config,
    tiny_tiled_config,
)
from pipelines.conversation import (
    IGNORE_INDEX,
    VICUNA_V1,
    ChatTemplate,
    RecordError,
    encode,
    parse_turns,
    prompt_template,
    render,
    split_supervised,
)
from pipelines.images import square_background
from pipelines.train.collate import collate

WORDS = "what color shape is the ring red blue square yes no".split()
SIZES = [(32, 32), (20, 12), (16, 32), (32, 16)]  # (height, width)


@pytest.fixture(scope="module")
def tiled():
    config = tiny_tiled_config("llava_next", "llama", vocab_size=128)
    return tiny_llava(config, seed=0), build_processor(config, WORDS)


def conversation(turns: int = 2) -> list[dict]:
    questions = ["what color is the ring?", "is there a square?", "what shape is red?"]
    answers = ["red", "no", "ring"]
    out = []
    for i in range(turns):
        out.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + questions[i]})
        out.append({"from": "gpt", "value": answers[i]})
    return out


def test_the_tiled_families_take_the_processors_chat_template(tiled):
    _, processor = tiled
    template = prompt_template(processor)
    assert isinstance(template, ChatTemplate)
    prompt = render(parse_turns(conversation(2)), template)
    expected = "USER: <image>\nwhat color is the ring? ASSISTANT: red</s>USER: is there a square? ASSISTANT: no</s>"
    assert prompt.text == expected  # TINY_CHAT_TEMPLATE, written out by hand
    assert [prompt.text[a:b] for a, b in prompt.answer_spans] == ["red</s>", "no</s>"]
    assert prompt_template(build_processor(tiny_llava_config(), WORDS)) is VICUNA_V1
    assert square_background(processor) is None  # anyres takes the image as it is
    bare = build_processor(tiny_tiled_config(), WORDS)
    bare.chat_template = None
    with pytest.raises(ValueError, match="LlavaNextProcessor has no chat_template"):
        prompt_template(bare)


def test_a_template_that_closes_turns_without_eos_gets_it_after_each_answer(tiled):
    """llava-hf's vicuna template ends an assistant turn with a space: the end-of-sequence token is written after
    each answer and supervised (LLaVA's ``</s>``), so the model learns to stop; an answer's own trailing space is
    the template's to write; an answer the template drops fails as a counted record error."""
    _, processor = tiled
    bare = build_processor(tiny_tiled_config(), WORDS)
    bare.chat_template = TINY_CHAT_TEMPLATE.replace("{{ '</s>' }}", "{{ ' ' }}")
    turns = parse_turns(conversation(2))
    turns[0] = (turns[0][0], "red ")
    prompt = render(turns, prompt_template(bare))
    assert (
        prompt.text
        == "USER: <image>\nwhat color is the ring? ASSISTANT: red</s>  USER: is there a square? ASSISTANT: no</s> "
    )
    assert [prompt.text[a:b] for a, b in prompt.answer_spans] == ["red</s>", "no</s>"]
    bare.chat_template = bare.chat_template.replace(
        "{{ item['text'] }}{% endfor %}{{ ' ' }}{% endif %}", "{% endfor %}{{ ' ' }}{% endif %}"
    )
    with pytest.raises(RecordError, match="malformed_conversation: answer 0 is not in the chat template's text"):
        render(turns, prompt_template(bare))


@pytest.mark.parametrize("size", SIZES)
def test_encode_gives_the_tiles_and_vision_tokens_the_model_reads(tiled, size):
    model, processor = tiled
    prompt = render(parse_turns(conversation(2)), prompt_template(processor))
    rng = np.random.default_rng(sum(size))
    row = encode(processor, prompt, Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
    tile = model.config.vision_config.image_size
    tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, tile)
    assert row["pixel_values"].shape == (tiles, 3, tile, tile) and row["image_sizes"].tolist() == list(size)
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=torch.from_numpy(row["pixel_values"])[None], image_sizes=torch.tensor([size])
        )
    assert int((row["input_ids"] == model.config.image_token_id).sum()) == features.pooler_output[0].shape[0]
    answers = [processor.tokenizer.decode(run) for run in split_supervised(row["labels"])]
    assert answers == ["red </s>", "no </s>"]


def test_collate_pads_tiles_and_a_batch_gives_each_row_what_it_gets_alone(tiled):
    """HF's own LLaVA-NeXT on the collated batch (right padding, zero tiles) against each row alone; then one
    LVPruning training step on it, in fp32 and bf16."""
    model, processor = tiled
    prompt = render(parse_turns(conversation(1)), prompt_template(processor))
    rng = np.random.default_rng(0)
    rows = [encode(processor, prompt, Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8))) for s in SIZES]
    batch = collate(rows, processor.tokenizer.pad_token_id, "right")
    assert batch["pixel_values"].shape[:2] == (4, 5) and batch["image_sizes"].tolist() == [list(s) for s in SIZES]
    assert not batch["pixel_values"][1, 3:].any()  # a 3-tile image's padding tiles are zeros
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        together = model(**inputs).logits
        for i, row in enumerate(rows):
            alone = model(
                input_ids=torch.from_numpy(row["input_ids"])[None],
                pixel_values=torch.from_numpy(row["pixel_values"])[None],
                image_sizes=torch.from_numpy(row["image_sizes"])[None],
            ).logits[0]
            torch.testing.assert_close(together[i, : len(alone)], alone, atol=1e-5, rtol=1e-5)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [2] * 4  # "red </s>" in each row
    for dtype in (torch.float32, torch.bfloat16):
        pruning = PruningConfig(layers=(0, 1), train_ratios=(0.5, 0.25), infer_ratios=(0.5, 0.25), num_heads=4)
        pruner = attach(tiny_llava(model.config, seed=0).to(dtype), pruning).to(dtype).train()
        pixels = batch["pixel_values"].to(dtype)
        out = pruner(**{**batch, "pixel_values": pixels})
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.keep_fractions.shape == (4, 2)
        grads = [p.grad for p in pruner.decision_modules.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert not any(p.grad is not None for p in pruner.model.parameters())
