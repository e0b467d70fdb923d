"""End to end on the shipped toy base model: batched, cached generation answers toy questions, and with nothing
pruned it is token for token transformers' own ``generate``. CI also runs this file against the newest releases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvpruning import PruningConfig, attach
from pipelines.conversation import single_turn_prompt
from pipelines.eval.inference import question_text
from pipelines.toy.base import SHIPPED_BASE_MODEL
from pipelines.toy.scenes import SceneSpec, make_split, render
from tests.lvpruning.conftest import generate_alone

STAGES = (0, 1, 2)


@pytest.fixture(scope="module")
def toy_batch():
    """Eight test-split questions (two of each type), left-padded, with their answers read off the scenes."""
    spec = SceneSpec()
    processor = AutoProcessor.from_pretrained(SHIPPED_BASE_MODEL)
    processor.tokenizer.padding_side = "left"
    pairs = [(scene, q) for scene, questions in make_split(7, 8, spec, "test") for q in questions]
    images = [Image.fromarray(render(scene, spec)) for scene, _ in pairs]
    prompts = [single_turn_prompt(question_text("toy", {"text": q.text})) for _, q in pairs]  # as the evaluation
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    return processor, dict(inputs), [q.answer for _, q in pairs]


@pytest.fixture(scope="module")
def base_model() -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(SHIPPED_BASE_MODEL).eval()


def answers(processor, tokens: torch.Tensor, prompt_length: int) -> list[str]:
    return [t.strip() for t in processor.batch_decode(tokens[:, prompt_length:], skip_special_tokens=True)]


def test_unpruned_cached_generation_is_transformers_generate_and_answers_the_questions(toy_batch, base_model):
    processor, inputs, truth = toy_batch
    tok = processor.tokenizer
    common = {"max_new_tokens": 4, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        expected = base_model.generate(**inputs, do_sample=False, **common)
    pruner = attach(base_model, PruningConfig(layers=STAGES, train_ratios=(1.0, 1.0, 1.0))).eval()
    try:
        got = pruner.generate(**inputs, keep_ratios=(1.0, 1.0, 1.0), **common)
    finally:
        pruner.detach()
    assert torch.equal(got, expected)
    said = answers(processor, got, inputs["input_ids"].shape[1])
    # 2 of 8 wrong would be far below the shipped model's accuracy on its test split (benchmarks/TOY_WORLD.md,
    # "Eighth round")
    assert np.mean([a == t for a, t in zip(said, truth)]) >= 0.75, list(zip(said, truth))


def test_pruned_cached_generation_of_a_padded_batch_is_what_each_question_gets_alone(toy_batch, base_model):
    """Decision modules (fresh, seeded) at the main job's schedule; the batch mixes prompt lengths."""
    processor, inputs, _ = toy_batch
    tok = processor.tokenizer
    ratios = (0.5, 0.3, 0.1)
    torch.manual_seed(0)
    pruner = attach(base_model, PruningConfig(layers=STAGES, train_ratios=ratios)).eval()
    common = {"keep_ratios": ratios, "max_new_tokens": 4, "eos_token_id": tok.eos_token_id}
    common["pad_token_id"] = tok.pad_token_id
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    try:
        together = pruner.generate(**inputs, **common)
        for i in range(len(lengths)):
            alone = generate_alone(pruner, inputs, i, **common)
            new_together, new_alone = together[i, inputs["input_ids"].shape[1] :], alone[0, int(lengths[i]) :]
            n = min(len(new_together), len(new_alone))  # a batch stops when all of it has ended
            assert torch.equal(new_together[:n], new_alone[:n])
    finally:
        pruner.detach()
