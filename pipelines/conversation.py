"""Conversation templates and their tokenization into ``input_ids`` / ``labels``: LLaVA-1.5's hand-written
``vicuna_v1`` (kept to reproduce LLaVA-1.5's published numbers), and for LLaVA-NeXT / OneVision and Qwen-VL the
processor's own chat template (:class:`ChatTemplate`; :func:`prompt_template` picks one for a processor).

The prompt is built exactly as LLaVA's ``conversation.py`` (``SeparatorStyle.TWO``) builds it::

    "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

with the ``<image>`` placeholder moved to the start of the first human turn and followed by "\\n"
(``train.py::preprocess_multimodal``). As in ``train.py::preprocess_v1``, only the answers and the ``</s>``
closing each of them are supervised; system prompt, roles, questions and image are ``IGNORE_INDEX``.

LLaVA finds the answers by re-tokenizing pieces of the prompt and subtracting hand-tuned offsets (which
depend on the sentencepiece version). Here the answers are character spans, and a token is supervised when
its character span (``return_offsets_mapping`` of the model's own fast tokenizer) overlaps an answer span.
The processor expands the single image token (``<image>``; Qwen-VL's ``<|image_pad|>``) into ``image_seq_length``
image tokens (576 for LLaVA-1.5), which shifts every later character; the shift is read off the offsets of the last
image token, so the masking does not depend on how the expansion is spelled.

With a chat template the answers' spans are found the same way: the prompt is rendered up to each answer (with
the template's generation prompt) and through it, so the span covers the answer and whatever the template closes
the turn with (its end-of-turn token, the ``</s>`` of ``vicuna_v1``).

Shapes: L = tokens after image expansion, H = W = the vision tower's image size, S tiles (anyres), P Qwen-VL's
patches of D pixels each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")  # what encode() returns (+ a size key)
# An image's size beside its pixels, where the model takes one: LLaVA-NeXT / OneVision's (height, width), Qwen-VL's
# patch grid (t, h, w); the models' own argument names.
SIZE_KEYS = ("image_sizes", "image_grid_thw")


@dataclass(frozen=True)
class ConversationTemplate:
    """A ``SeparatorStyle.TWO`` template: ``system + sep``, then ``role: message`` closed by sep / sep2."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def render(self, turns: Sequence[tuple[str, str]]) -> Prompt:
        """``get_prompt()`` of LLaVA's ``SeparatorStyle.TWO`` for complete (question, answer) rounds."""
        user, assistant = self.roles
        text = self.system + self.sep
        spans = []
        for question, answer in turns:
            text += f"{user}: {question}{self.sep}{assistant}: "
            start = len(text)
            text += answer + self.sep2
            spans.append((start, len(text)))
        return Prompt(text=text, answer_spans=tuple(spans))

    def single_turn(self, question: str) -> str:
        """The inference prompt for one question (image placeholder included), ending with "ASSISTANT:" as
        LLaVA's ``model_vqa_loader``."""
        user, assistant = self.roles
        return f"{self.system}{self.sep}{user}: {question}{self.sep}{assistant}:"


class ChatTemplate:
    """A processor's own chat template (``processor.apply_chat_template``): the prompts of LLaVA-NeXT,
    LLaVA-OneVision and Qwen-VL, whose checkpoints each ship their own."""

    name = "chat_template"

    def __init__(self, processor: Any) -> None:
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{type(processor).__name__} has no chat_template: its prompts cannot be built")
        self.processor = processor

    def _text(self, turns: Sequence[tuple[str, str | None]], generation_prompt: bool) -> str:
        messages = []
        for question, answer in turns:
            content = [{"type": "text", "text": question.replace(IMAGE_PLACEHOLDER, "").strip()}]
            if IMAGE_PLACEHOLDER in question:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, turns: Sequence[tuple[str, str]]) -> Prompt:
        """The conversation as the template writes it, with each answer's span through the end of its turn. Where
        the template closes an assistant turn without the end-of-sequence token (llava-hf's vicuna template), the
        token is written after the answer and supervised, as LLaVA's ``preprocess_v1`` does with ``</s>``: the
        model must learn to stop."""
        text, parts = self._text(turns, generation_prompt=False), []
        for i, (_, answer) in enumerate(turns):
            asked = self._text([*turns[:i], (turns[i][0], None)], generation_prompt=True)
            answered = self._text(turns[: i + 1], generation_prompt=False).rstrip()
            if not (text.startswith(answered) and answered.startswith(asked)):
                raise ValueError(f"{type(self.processor).__name__}'s chat template does not extend its prompts")
            start = answered.find(answer.strip(), len(asked))
            if start < 0:
                raise RecordError("malformed_conversation", f"answer {i} is not in the chat template's text")
            parts.append((start, start + len(answer.strip()), len(answered)))
        eos, spans = self.processor.tokenizer.eos_token or "", []
        for start, end, turn_end in reversed(parts):  # from the last: inserting shifts only what follows
            if eos and eos not in text[end:turn_end]:
                text = text[:end] + eos + text[end:]
                spans = [(a + len(eos), b + len(eos)) for a, b in spans]
                turn_end += len(eos)
            spans.insert(0, (start, turn_end))
        return Prompt(text=text, answer_spans=tuple(spans))

    def single_turn(self, question: str) -> str:
        """The inference prompt for one question, ending with the template's generation prompt."""
        return self._text([(question, None)], generation_prompt=True)


TILED_PROCESSORS = ("LlavaNextProcessor", "LlavaOnevisionProcessor")
QWEN_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")


def any_resolution(processor: Any) -> bool:
    """Whether ``processor`` takes an image at its own size and aspect: cut into anyres tiles (LLaVA-NeXT,
    OneVision) or into patches at its native resolution (Qwen-VL, within ``min_pixels`` / ``max_pixels``). Such an
    image is not padded to a square, its number of vision tokens depends on its size, and the prompts are the
    processor's chat template."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    return bool(names & {*TILED_PROCESSORS, *QWEN_VL_PROCESSORS})


def prompt_template(processor: Any) -> ConversationTemplate | ChatTemplate:
    """The template of ``processor``'s model: ``vicuna_v1`` for LLaVA-1.5, the processor's own chat template for
    the families of :func:`any_resolution`."""
    return ChatTemplate(processor) if any_resolution(processor) else VICUNA_V1


# LLaVA-1.5 is trained (scripts/v1_5/finetune.sh: --version v1) and evaluated (--conv-mode vicuna_v1)
# with this one.
VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
# LLaVA's ``llava_v1``: the same template with "human" in the system prompt.
LLAVA_V1 = ConversationTemplate(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
)
TEMPLATES = {t.name: t for t in (VICUNA_V1, LLAVA_V1)}


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is the name it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation and the character spans ``[start, end)`` of each answer plus its ``sep2``."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]


def load_processor(name_or_path: str, options: tuple[tuple[str, int], ...] = ()) -> Any:
    """The model's processor (a hub id, local or ``s3://`` folder), with ``options`` (``model.processor``):
    ``AutoProcessor``'s, or the toy Qwen2.5-VL's image-only one (``lvpruning.tiny.ImageQwenVLProcessor``), which
    ``AutoProcessor`` does not know (it would give the bare tokenizer)."""
    import json
    from pathlib import Path

    from transformers import AutoProcessor

    from lvpruning.tiny import ImageQwenVLProcessor
    from pipelines.storage import local_copy

    path, kwargs = local_copy(name_or_path), processor_kwargs(options)
    saved = Path(path) / "processor_config.json"
    if saved.is_file() and json.loads(saved.read_text()).get("processor_class") == ImageQwenVLProcessor.__name__:
        return ImageQwenVLProcessor.from_pretrained(path, **kwargs)
    return AutoProcessor.from_pretrained(path, **kwargs)


def processor_kwargs(options: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    """``model.processor``'s options as the processors take them: Qwen-VL's pixel bounds ``min_pixels`` /
    ``max_pixels`` as its image processor's ``size`` (``shortest_edge`` / ``longest_edge``, both in pixels: transformers
    deprecates the two names)."""
    kwargs = dict(options)
    if "min_pixels" in kwargs or "max_pixels" in kwargs:
        kwargs["size"] = {"shortest_edge": kwargs.pop("min_pixels"), "longest_edge": kwargs.pop("max_pixels")}
    return kwargs


def parse_turns(conversations: Any) -> list[tuple[str, str]]:
    """Validate LLaVA ``conversations`` into (question, answer) pairs, ``<image>`` leading question 1.

    Raises ``RecordError`` with reason ``malformed_conversation`` (not a list, unknown or out-of-order
    roles, an empty value, a question without answer) or ``bad_image_placeholder`` (no ``<image>``,
    several, or one inside an answer).
    """
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("malformed_conversation", "conversations is not a non-empty list")
    if len(conversations) % 2:
        raise RecordError("malformed_conversation", f"{len(conversations)} turns: a question has no answer")
    values: list[str] = []
    for i, turn in enumerate(conversations):
        expected = HUMAN if i % 2 == 0 else GPT
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise RecordError("malformed_conversation", f"turn {i} is from {got!r}, expected {expected!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise RecordError("malformed_conversation", f"turn {i} has an empty or non-string value")
        values.append(value)

    n_questions = sum(v.count(IMAGE_PLACEHOLDER) for v in values[0::2])
    n_answers = sum(v.count(IMAGE_PLACEHOLDER) for v in values[1::2])
    if n_answers or n_questions != 1:
        raise RecordError(
            "bad_image_placeholder", f"{n_questions} {IMAGE_PLACEHOLDER} in questions, {n_answers} in answers"
        )
    # preprocess_multimodal: remove the placeholder, strip, put it in front followed by a newline.
    values = [v.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in v else v for v in values]
    values[0] = f"{IMAGE_PLACEHOLDER}\n{values[0]}".strip()
    return list(zip(values[0::2], values[1::2], strict=True))


def render(turns: Sequence[tuple[str, str]], template: ConversationTemplate | ChatTemplate = VICUNA_V1) -> Prompt:
    """The prompt of complete (question, answer) rounds in ``template``, with the answers' character spans."""
    return template.render(turns)


def single_turn_prompt(
    question: str, image: bool = True, template: ConversationTemplate | ChatTemplate = VICUNA_V1
) -> str:
    """The inference prompt for one question (the image first, as LLaVA's ``model_vqa_loader``), ending where the
    answer starts."""
    if image:
        question = f"{IMAGE_PLACEHOLDER}\n{question.replace(IMAGE_PLACEHOLDER, '').strip()}"
    return template.single_turn(question)


def count_image_tokens(processor: Any) -> int | None:
    """How many image tokens the processor expands one ``<image>`` into (576 for LLaVA-1.5); None where it depends
    on the image's size (:func:`any_resolution`)."""
    from PIL import Image

    if any_resolution(processor):
        return None
    probe = Image.new("RGB", (64, 64))  # any size: the image processor resizes and crops it
    ids = processor(text=[processor.image_token], images=[probe])["input_ids"][0]
    return int(np.count_nonzero(np.asarray(ids) == processor.image_token_id))


def text_length(processor: Any, prompt: Prompt, n_image_tokens: int) -> int:
    """Tokens of ``prompt`` after image expansion, from the text alone: the ``<image>`` token becomes
    ``n_image_tokens`` (a special token, so its neighbours tokenize the same either way)."""
    n_ids = len(processor.tokenizer(prompt.text)["input_ids"])
    return n_ids + prompt.text.count(IMAGE_PLACEHOLDER) * (n_image_tokens - 1)


def supervised_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(L,) bool: tokens whose character span ``offsets`` (L, 2) overlaps one of ``spans``."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (starts < end) & (ends > start) & (ends > starts)
    return mask


def encode(processor: Any, prompt: Prompt, image: Any) -> dict[str, np.ndarray]:
    """Model inputs for one conversation and its PIL image, with LLaVA's answer-only ``labels``.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (L,) int64 and the image's inputs
    (:func:`image_inputs`).
    """
    out = processor(text=[prompt.text], images=[image], return_offsets_mapping=True, return_tensors="np")
    input_ids = np.asarray(out["input_ids"][0], dtype=np.int64)  # (L,)
    offsets = np.asarray(out["offset_mapping"][0], dtype=np.int64)  # (L, 2) in the expanded text

    image_at = prompt.text.index(processor.image_token)  # as the template wrote it: one, before the expansion
    if any(start < image_at for start, _ in prompt.answer_spans):
        raise ValueError("the image must come before every answer (parse_turns puts it in the first question)")
    image_positions = np.flatnonzero(input_ids == processor.image_token_id)
    if len(image_positions) == 0:
        raise ValueError(f"the processor produced no image token for prompt {prompt.text[:80]!r}")
    # Every answer comes after the image (it is in the first question), so all move by the same expansion.
    shift = int(offsets[image_positions[-1], 1]) - (image_at + len(processor.image_token))
    spans = [(start + shift, end + shift) for start, end in prompt.answer_spans]
    mask = supervised_mask(offsets, spans)
    mask[image_positions] = False
    if len(spans) and not mask.any():
        raise ValueError(f"no token of the answers was found in {prompt.text[:80]!r}")

    labels = np.where(mask, input_ids, IGNORE_INDEX)  # (L,)
    return {
        "input_ids": input_ids,
        "attention_mask": np.asarray(out["attention_mask"][0], dtype=np.int64),
        "labels": labels,
    } | image_inputs(out)


def image_inputs(encoded: Any) -> dict[str, np.ndarray]:
    """The pixels and size (:data:`SIZE_KEYS`) of the one image of a processor's output: ``pixel_values`` (3, H, W)
    for LLaVA-1.5; (S, 3, H, W) and ``image_sizes`` (2,) (height, width) for the tiled families; Qwen-VL's patches
    (P, D), every row of the output (its processor flattens the batch's images), and ``image_grid_thw`` (3,)."""
    if "image_grid_thw" in encoded:
        return {
            "pixel_values": np.asarray(encoded["pixel_values"], dtype=np.float32),  # (P, D)
            "image_grid_thw": np.asarray(encoded["image_grid_thw"][0], dtype=np.int64),  # (3,)
        }
    out = {"pixel_values": np.asarray(encoded["pixel_values"][0], dtype=np.float32)}  # (3, H, W) or (S, 3, H, W)
    if "image_sizes" in encoded:
        out["image_sizes"] = np.asarray(encoded["image_sizes"][0], dtype=np.int64)
    return out


def whole_image_inputs(processor: Any, prompt: str, image: Any) -> dict[str, np.ndarray]:
    """What LRS-VQA's pyramid (``lvpruning.lrs_vqa.PyramidModel``) takes of one prompt and its PIL image: the
    prompt's ids with the one image token left unexpanded, ``whole_input_ids`` (L,); the image at full resolution,
    rescaled and normalised as the image processor does each of its tiles, ``whole_pixel_values`` (3, H, W); and
    ``whole_image_sizes`` (2,) (height, width)."""
    ip = processor.image_processor
    ids = np.asarray(processor.tokenizer(prompt)["input_ids"], dtype=np.int64)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    if ip.do_rescale:
        pixels = pixels * ip.rescale_factor
    if ip.do_normalize:
        pixels = (pixels - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
    sizes = np.asarray(pixels.shape[:2], dtype=np.int64)
    return {"whole_input_ids": ids, "whole_pixel_values": np.ascontiguousarray(pixels.transpose(2, 0, 1))} | {
        "whole_image_sizes": sizes
    }


WHOLE_BLANK = {  # whole_image_inputs' shapes for rows that have no usable image (never answered)
    "whole_input_ids": np.zeros(0, dtype=np.int64),
    "whole_pixel_values": np.zeros((3, 8, 8), dtype=np.float32),
    "whole_image_sizes": np.asarray([8, 8], dtype=np.int64),
}


def blank_image(processor: Any) -> dict[str, np.ndarray]:
    """:func:`image_inputs` of an 8 x 8 black image through ``processor``'s image processor, pixels zeroed: the
    shapes the model takes, for rows that have no usable image (they are never answered)."""
    from PIL import Image

    probe = image_inputs(processor.image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="np"))
    return probe | {"pixel_values": np.zeros_like(probe["pixel_values"])}


def size_key(processor: Any) -> str | None:
    """The key of :data:`SIZE_KEYS` that ``processor``'s images come with, None for LLaVA-1.5's."""
    return next((name for name in SIZE_KEYS if name in blank_image(processor)), None)


def split_supervised(labels: np.ndarray) -> list[np.ndarray]:
    """The runs of consecutive supervised ids in ``labels``, one per answer (to inspect and test masking)."""
    supervised = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], supervised.astype(np.int8), [0]])))
    return [labels[start:end] for start, end in zip(edges[0::2], edges[1::2], strict=True)]
