"""The vicuna_v1 template and LLaVA's answer-only labels, with the tiny processor and a Llama-style one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, LlavaProcessor

from lvpruning.tiny import build_processor, tiny_llava_config
from pipelines.conversation import (
    IGNORE_INDEX,
    LLAVA_V1,
    VICUNA_V1,
    Prompt,
    RecordError,
    count_image_tokens,
    encode,
    parse_turns,
    render,
    single_turn_prompt,
    split_supervised,
    supervised_mask,
    text_length,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTIONS = ("what color is the cube ?", "how many spheres are there ?")
ANSWERS = ("the cube is red .", "two spheres , both blue .")
WORDS = "what color is cube how many spheres there red two both blue".split()


def conversation(first_question: str = f"{QUESTIONS[0]}\n<image>") -> list[dict[str, str]]:
    return [
        {"from": "human", "value": first_question},
        {"from": "gpt", "value": ANSWERS[0]},
        {"from": "human", "value": QUESTIONS[1]},
        {"from": "gpt", "value": ANSWERS[1]},
    ]


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return build_processor(tiny_llava_config(), WORDS)


@pytest.fixture(scope="module")
def llama_processor(processor: LlavaProcessor) -> LlavaProcessor:
    """A LlavaProcessor whose tokenizer is a ``LlamaTokenizer`` (byte-fallback BPE over "▁"-marked words).

    It has the quirks of the real LLaVA-1.5 tokenizer that the masking must survive: "▁" glued to the next
    word, a lone "▁" before ``<image>``, no "▁" after ``</s>``, several tokens per word.
    """
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [render(parse_turns(conversation())).text.replace("</s>", " "), LLAVA_V1.system]
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(corpus, trainer)
    spec = json.loads(core.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_vicuna_v1_two_turns_is_llava_string() -> None:
    prompt = render(parse_turns(conversation()))
    expected = (
        f"{SYSTEM} USER: <image>\n{QUESTIONS[0]} ASSISTANT: {ANSWERS[0]}</s>"
        f"USER: {QUESTIONS[1]} ASSISTANT: {ANSWERS[1]}</s>"
    )
    assert prompt.text == expected
    assert [prompt.text[s:e] for s, e in prompt.answer_spans] == [f"{a}</s>" for a in ANSWERS]


def test_llava_v1_differs_only_in_system_prompt() -> None:
    turns = parse_turns(conversation())
    assert LLAVA_V1.system == SYSTEM.replace("user", "human")
    assert render(turns, LLAVA_V1).text == render(turns, VICUNA_V1).text.replace(SYSTEM, LLAVA_V1.system)


@pytest.mark.parametrize("question", ["<image>\nwhat color is the cube ?", "what color is the cube ? <image>"])
def test_image_placeholder_leads_the_first_question(question: str) -> None:
    turns = parse_turns(conversation(question))
    assert turns[0][0] == "<image>\nwhat color is the cube ?"
    assert "<image>" not in turns[1][0]


def test_image_placeholder_in_a_later_question_moves_to_the_first() -> None:
    record = conversation(QUESTIONS[0])
    record[2]["value"] = f"<image>\n{QUESTIONS[1]}"
    assert parse_turns(record) == [(f"<image>\n{QUESTIONS[0]}", ANSWERS[0]), (QUESTIONS[1], ANSWERS[1])]


def test_single_turn_prompt_for_inference() -> None:
    assert (
        single_turn_prompt("what color is the cube ?") == f"{SYSTEM} USER: <image>\nwhat color is the cube ? ASSISTANT:"
    )
    assert single_turn_prompt("<image>\nhi") == single_turn_prompt("hi")
    assert single_turn_prompt("hi", image=False) == f"{SYSTEM} USER: hi ASSISTANT:"


@pytest.mark.parametrize(
    ("conversations", "reason"),
    [
        ("<image>\nhi", "malformed_conversation"),
        ([], "malformed_conversation"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}], "malformed_conversation"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": " "}], "malformed_conversation"),
        ([{"from": "human", "value": "<image>\nq"}], "malformed_conversation"),
        ([{"from": "human", "value": "<image>\nq"}, "answer"], "malformed_conversation"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "bad_image_placeholder"),
        (
            [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
            "bad_image_placeholder",
        ),
        (
            [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "<image>a"}],
            "bad_image_placeholder",
        ),
    ],
)
def test_unusable_conversations_are_named(conversations: object, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_turns(conversations)
    assert info.value.reason == reason


def test_labels_supervise_exactly_the_answers_after_image_expansion(processor: LlavaProcessor) -> None:
    prompt = render(parse_turns(conversation()))
    row = encode(processor, prompt, Image.new("RGB", (40, 24), (200, 30, 30)))
    tokenizer = processor.tokenizer
    n_image = count_image_tokens(processor)
    assert n_image == 64  # (32 / 4) ** 2 patches, CLS dropped
    assert np.count_nonzero(row["input_ids"] == processor.image_token_id) == n_image
    assert len(row["input_ids"]) == text_length(processor, prompt, n_image)
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["labels"][0] == IGNORE_INDEX
    assert row["attention_mask"].tolist() == [1] * len(row["input_ids"])
    assert row["pixel_values"].shape == (3, 32, 32)

    runs = split_supervised(row["labels"])
    assert [tokenizer.decode(run, skip_special_tokens=True) for run in runs] == list(ANSWERS)
    for run, answer in zip(runs, ANSWERS, strict=True):  # the answer's tokens and its </s>, nothing else
        assert run.tolist() == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    supervised = row["labels"] != IGNORE_INDEX
    assert (row["labels"][supervised] == row["input_ids"][supervised]).all()


def test_labels_with_a_llama_style_tokenizer(llama_processor: LlavaProcessor) -> None:
    prompt = render(parse_turns(conversation()))
    row = encode(llama_processor, prompt, Image.new("RGB", (32, 32)))
    tokenizer = llama_processor.tokenizer
    assert np.count_nonzero(row["input_ids"] == llama_processor.image_token_id) == 64
    assert len(row["input_ids"]) == text_length(llama_processor, prompt, 64)
    runs = split_supervised(row["labels"])
    assert [tokenizer.decode(run) for run in runs] == [f"{a}</s>" for a in ANSWERS]
    assert tokenizer.convert_ids_to_tokens(runs[0].tolist())[0].startswith("▁")  # the space-marked first word


def test_supervised_mask_is_overlap_of_character_spans() -> None:
    offsets = np.array([[0, 0], [0, 4], [4, 5], [5, 9], [9, 13], [13, 13]])  # (L, 2)
    assert supervised_mask(offsets, [(5, 13)]).tolist() == [False, False, False, True, True, False]
    assert supervised_mask(offsets, [(3, 6)]).tolist() == [False, True, True, True, False, False]


def test_prompt_without_answers_has_no_labels(processor: LlavaProcessor) -> None:
    text = single_turn_prompt(QUESTIONS[0])
    row = encode(processor, Prompt(text=text, answer_spans=()), Image.new("RGB", (32, 32)))
    assert (row["labels"] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(row["input_ids"][-2:]) == "assistant :"
