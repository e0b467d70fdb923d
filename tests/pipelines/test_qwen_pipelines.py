"""The jobs' pipelines on Qwen2-VL and Qwen2.5-VL, tiny and random, with a processor built offline (images at their
own resolution): prompts from the chat template with one ``<|image_pad|>`` per merged patch, rows of different image
sizes collated into one batch that trains as its samples do alone, batched answers equal to each sample's own
``generate``, Hugging Face's own model fed its 3-D positions (``mm_token_type_ids``), calibration and latency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from lvpruning import PruningConfig, attach, engine, from_pretrained
from lvpruning.policies import get_policy
from lvpruning.tiny import build_processor, tiny_llava, tiny_qwen_vl_config
from pipelines.conversation import (
    IGNORE_INDEX,
    ChatTemplate,
    any_resolution,
    encode,
    load_processor,
    parse_turns,
    prompt_template,
    render,
    split_supervised,
)
from pipelines.eval.inference import Preprocessor
from pipelines.eval.latency import LatencyOptions, time_settings
from pipelines.eval.models import ModelSpec, Setting, timed_generate
from pipelines.images import square_background
from pipelines.stages import STAGES
from pipelines.sweep.calibration import hidden_similarity
from pipelines.toy.base import SHIPPED_BASE_MODEL, ToyWorld
from pipelines.toy.model import qwen_from_llava, toy_config, toy_processor
from pipelines.train.collate import collate

WORDS = "what color shape is the ring red blue square yes no".split()
SIZES = [(40, 24), (32, 32), (16, 48), (16, 16)]  # (height, width): multiples of 8 pixels, one merged patch
PRUNING = PruningConfig(layers=(0, 1), train_ratios=(0.5, 0.25), infer_ratios=(0.5, 0.25), num_heads=4)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    config = tiny_qwen_vl_config(request.param, num_layers=4)
    return tiny_llava(config, seed=0), build_processor(config, WORDS)


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def conversation() -> list[dict]:
    return [{"from": "human", "value": "<image>\nwhat color is the ring?"}, {"from": "gpt", "value": "red"}]


def test_prompts_are_the_chat_templates_with_one_image_pad_per_merged_patch(qwen):
    model, processor = qwen
    template = prompt_template(processor)
    assert isinstance(template, ChatTemplate) and any_resolution(processor) and square_background(processor) is None
    prompt = render(parse_turns(conversation()), template)
    assert prompt.text == (  # TINY_QWEN_CHAT_TEMPLATE, written out by hand
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the ring?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    for seed, (height, width) in enumerate(SIZES):
        row = encode(processor, prompt, picture((height, width), seed))
        grid = (1, height // 4, width // 4)  # 4-pixel patches, the image at its own size
        assert row["image_grid_thw"].tolist() == list(grid)
        assert row["pixel_values"].shape == (np.prod(grid), 3 * 2 * 4 * 4)  # (P, D): D = 3 * frames * 4 * 4
        pads = int((row["input_ids"] == processor.image_token_id).sum())
        assert pads == (height // 8) * (width // 8)  # one per 2 x 2 merged patches
        with torch.no_grad():
            features = model.model.get_image_features(
                torch.from_numpy(row["pixel_values"]), torch.from_numpy(row["image_grid_thw"])[None]
            )
        assert pads == features.pooler_output[0].shape[0]
        assert [processor.tokenizer.decode(run) for run in split_supervised(row["labels"])] == ["red <|im_end|>"]


def rows_of(processor, sizes=SIZES) -> list[dict[str, np.ndarray]]:
    prompt = render(parse_turns(conversation()), prompt_template(processor))
    return [encode(processor, prompt, picture(size, seed)) for seed, size in enumerate(sizes)]


def test_a_collated_batch_trains_as_its_samples_do_alone(qwen, monkeypatch):
    """Rows of four image sizes, right-padded with their patches concatenated: Hugging Face's own model gives each
    row's logits alone (the base stage's inputs); an LVPruning training step (hard decisions from the modules'
    own logits, no Gumbel noise) gives each sample's loss terms and keep fractions alone."""
    model, processor = qwen
    rows = rows_of(processor)
    batch = collate(rows, processor.tokenizer.pad_token_id, "right")
    patches = [int(np.prod(r["image_grid_thw"])) for r in rows]
    assert batch["pixel_values"].shape == (sum(patches), 96) and batch["image_grid_thw"].shape == (4, 3)
    base = STAGES["base"]
    with torch.no_grad():
        together = model(**{k: v for k, v in base.inputs(model, batch).items() if k != "labels"}).logits
        for i, row in enumerate(rows):
            alone = {k: torch.from_numpy(v)[None] for k, v in row.items() if k not in ("labels", "pixel_values")}
            alone |= {"pixel_values": torch.from_numpy(row["pixel_values"])}
            types = (alone["input_ids"] == processor.image_token_id).int()  # as its processor returns them
            logits = model(**alone, mm_token_type_ids=types).logits[0]
            torch.testing.assert_close(together[i, : len(logits)], logits, atol=1e-5, rtol=1e-5)

    def decisions(gamma: torch.Tensor, tau: float) -> torch.Tensor:  # eq. 6's straight-through, without the noise
        soft = gamma.float().softmax(dim=-1)[..., 0]
        return (soft > 0.5).float() - soft.detach() + soft

    monkeypatch.setattr(engine, "gumbel_decisions", decisions)
    pruner = attach(model, PRUNING).train()
    out = pruner(**STAGES["pruning"].inputs(pruner, batch))
    out.loss.backward()
    assert all(p.grad is not None for p in pruner.decision_modules.parameters())
    lm, ratio, weights = [], [], []
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = pruner(**collate([row], processor.tokenizer.pad_token_id, "right"))
            lm.append(alone.lm_loss)
            ratio.append(alone.ratio_loss)
            weights.append(int((row["labels"][1:] != IGNORE_INDEX).sum()))
            torch.testing.assert_close(out.keep_fractions[i], alone.keep_fractions[0])
    expected_lm = sum(w * loss for w, loss in zip(weights, lm)) / sum(weights)  # a mean over supervised tokens
    torch.testing.assert_close(out.lm_loss.detach(), expected_lm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ratio_loss.detach(), torch.stack(ratio).mean(), atol=1e-6, rtol=1e-6)

    monkeypatch.undo()  # bf16, as the real models train: Gumbel decisions, finite loss and gradients
    half = attach(tiny_llava(model.config, seed=0).to(torch.bfloat16), PRUNING).to(torch.bfloat16).train()
    out = half(**{**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in half.decision_modules.parameters())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for seed, size in enumerate(SIZES):
        picture(size, seed).save(root / f"{seed}.png")
    return root


def requests(processor, root) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    pre = Preprocessor(processor, str(root))
    out = [pre.request(f"what color is the {w}?", f"{i}.png") for i, w in enumerate(["ring", "square", "ring", "red"])]
    return [r["input_ids"] for r in out], {k: [r[k] for r in out] for k in out[0] if k != "input_ids"}


def test_batched_answers_equal_each_samples_own_generate(qwen, images):
    """The evaluation's batch of left-padded prompts of four image sizes: the pruned answers are the engine's own
    ``generate`` of each sample alone; unpruned, those of Hugging Face's ``generate`` on its processor's output."""
    model, processor = qwen
    tokenizer = processor.tokenizer
    prompts, pictures = requests(processor, images)
    assert len({len(p) for p in prompts}) == 4  # left padding in every row but the longest
    assert pictures["pixel_values"][0].shape[0] != pictures["pixel_values"][1].shape[0]  # images of other sizes
    pruner = attach(model, PRUNING).eval()
    setting = Setting("random", (0.5, 0.25), seed=1)
    policy = get_policy("random", seed=1)
    texts, _, _ = timed_generate(pruner, tokenizer, prompts, pictures, setting, policy, max_new_tokens=4)
    base_texts, _, _ = timed_generate(model, tokenizer, prompts, pictures, Setting("none"), None, max_new_tokens=4)
    stop = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": 4}
    for i, prompt in enumerate(prompts):
        ids = torch.from_numpy(prompt)[None]
        patches = torch.from_numpy(pictures["pixel_values"][i])
        grid = torch.from_numpy(pictures["image_grid_thw"][i])[None]
        alone = pruner.generate(ids, patches, image_grid_thw=grid, policy=get_policy("random", seed=1), **stop)
        assert texts[i] == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()
        question = f"what color is the {['ring', 'square', 'ring', 'red'][i]}?"
        text = prompt_template(processor).single_turn(f"<image>\n{question}")
        hf = processor(text=[text], images=[Image.open(images / f"{i}.png")], return_tensors="pt")
        own = model.generate(**hf, do_sample=False, **stop)
        assert base_texts[i] == tokenizer.decode(own[0, hf["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_calibration_compares_with_hf_and_latency_times_every_setting(qwen, images, tmp_path):
    """Calibration's reference is Hugging Face's own model with its 3-D positions: keeping every token gives
    similarity 1 (1-D positions would not), pruning less; latency times each setting on the same requests."""
    model, processor = qwen
    model.save_pretrained(tmp_path / "model")
    spec = ModelSpec(str(tmp_path / "model"), pruning=PRUNING)
    prompts, pictures = requests(processor, images)
    pad = processor.tokenizer.pad_token_id
    kept = hidden_similarity(spec, Setting("random", (1.0, 1.0)), prompts, pictures, pad, batch_size=4)
    assert kept == pytest.approx(1.0, abs=1e-5)
    pruned = hidden_similarity(spec, Setting("random", (0.25, 0.25)), prompts, pictures, pad, batch_size=3)
    assert pruned < 0.9999
    settings = [Setting("none"), Setting("random", (0.5, 0.25))]
    options = LatencyOptions(batch_size=4, warmup=0, repeats=1, max_new_tokens=2)
    out = time_settings(spec, settings, {"input_ids": prompts} | pictures, processor.tokenizer, options)
    assert set(out) == {s.name for s in settings} and all(m["latency/e2e_ms"] > 0 for m in out.values())


def test_the_toy_llavas_decoder_carried_into_the_toy_qwen_gives_its_logits_on_text():
    """The shipped toy LLaVA's decoder and word embeddings in the toy Qwen2.5-VL: on text alone (no image), the
    logits of every shared token are the toy LLaVA's, and those of ``<|im_end|>`` its ``</s>``'s; before the carrying
    over, they are not."""
    llava = from_pretrained(str(SHIPPED_BASE_MODEL)).eval()
    llava_tokenizer = AutoTokenizer.from_pretrained(SHIPPED_BASE_MODEL)
    config = toy_config(family="qwen2_5_vl")
    tokenizer = toy_processor(config).tokenizer
    qwen = tiny_llava(config, seed=3)
    text = "what color is the square ? answer the question using a single word or phrase ."
    theirs, ours = llava_tokenizer(text, return_tensors="pt"), tokenizer(text, return_tensors="pt")
    shared = sorted(set(llava_tokenizer.get_vocab()) & set(tokenizer.get_vocab()))
    assert len(shared) > 60 and len(theirs["input_ids"][0]) == len(ours["input_ids"][0])
    ours_ids = [tokenizer.get_vocab()[t] for t in [*shared, "<|im_end|>"]]
    theirs_ids = [llava_tokenizer.get_vocab()[t] for t in [*shared, "</s>"]]  # Qwen's end of turn: LLaVA's end
    with torch.no_grad():
        expected = llava(**theirs).logits[..., theirs_ids]
        before = qwen(**ours).logits[..., ours_ids]
        after = qwen_from_llava(llava, llava_tokenizer, qwen, tokenizer)(**ours).logits[..., ours_ids]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, expected, atol=1e-2)


def test_the_qwen_variant_continues_the_toy_llava_and_its_processor_takes_the_options(tmp_path):
    """``data.toy_variant: qwen``'s base stage starts from the toy LLaVA carried into a toy Qwen2.5-VL (saved, read
    back by ``from_pretrained``); its saved processor is read back by ``load_processor`` with ``model.processor``'s
    options: a 64 x 64 image of the world is 64 vision tokens, 16 under ``max_pixels`` of 32 x 32."""
    world = ToyWorld.at(tmp_path, 0, variant="qwen")
    path = str(world.continued_model(SHIPPED_BASE_MODEL))
    model = from_pretrained(path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    llava = from_pretrained(str(SHIPPED_BASE_MODEL))
    ours, theirs = (
        load_processor(path).tokenizer.get_vocab(),
        AutoTokenizer.from_pretrained(SHIPPED_BASE_MODEL).get_vocab(),
    )
    assert torch.equal(model.lm_head.weight[ours["red"]], llava.lm_head.weight[theirs["red"]])
    text = prompt_template(load_processor(path)).single_turn("<image>\nwhat color is the ring?")
    image = picture((64, 64), 0)
    for options, tokens in [((), 64), ((("min_pixels", 16 * 16), ("max_pixels", 32 * 32)), 16)]:
        processor = load_processor(path, options)
        ids = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0]
        assert int((ids == model.config.image_token_id).sum()) == tokens


@pytest.mark.parametrize(
    "variant, least_right",
    [("qwen", 0.75), ("qwen_hires", 0.5)],  # 86.5% and 74.75% on their worlds' test splits
)
def test_the_shipped_toy_qwens_answer_their_worlds_questions_and_their_flops_read_their_images(
    tmp_path, variant, least_right
):
    """The shipped toy Qwen2.5-VLs (``pipelines/toy/base_model_qwen``: the default world, 64 x 64 images;
    ``base_model_qwen_hires``: the high-resolution world, images of 128 x 128, 64 x 128 and 128 x 64 read whole,
    256 or 128 vision tokens): 8 test questions batched as the evaluation batches them (the high-resolution world's
    images of different sizes in one batch), unpruned answers equal to Hugging Face's ``generate`` on its processor's
    output for each question alone, enough of them right; the FLOPs count reads the image its processor makes of the
    default 672 x 672 (the largest it takes: 64 x 64, or 128 x 128; 32 x 32 under ``max_pixels`` of 32 x 32) and of
    ``eval.flops_image_size`` (64 x 128: unresized by the high-resolution model, resized by the other)."""
    from pipelines.eval.evaluation import flops_image_size
    from pipelines.eval.inference import question_text
    from pipelines.toy.base import SHIPPED_BASE_MODELS
    from pipelines.toy.scenes import make_split
    from pipelines.toy.writer import world_spec

    spec = world_spec(variant)
    path = str(SHIPPED_BASE_MODELS[variant])
    model, processor = from_pretrained(path).eval(), load_processor(path)
    pairs = [(scene, q) for scene, questions in make_split(7, 8, spec, "test") for q in questions]
    questions = [question_text("toy", {"text": q.text}) for _, q in pairs]
    for i, (scene, _) in enumerate(pairs):
        Image.fromarray(spec.render(scene)).save(tmp_path / f"{i}.png")
    pre = Preprocessor(processor, str(tmp_path))
    out = [pre.request(q, f"{i}.png") for i, q in enumerate(questions)]
    sizes = {tuple(r["image_grid_thw"].reshape(-1).tolist()) for r in out}
    assert len(sizes) == 1 if variant == "qwen" else len(sizes) > 1, sizes  # images of several sizes, one batch
    prompts, pictures = [r["input_ids"] for r in out], {k: [r[k] for r in out] for k in out[0] if k != "input_ids"}
    texts, _, _ = timed_generate(model, processor.tokenizer, prompts, pictures, Setting("none"), None, 4)
    tokenizer = processor.tokenizer
    stop = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": 4}
    for i, question in enumerate(questions):
        text = prompt_template(processor).single_turn(f"<image>\n{question}")
        hf = processor(text=[text], images=[Image.open(tmp_path / f"{i}.png")], return_tensors="pt")
        own = model.generate(**hf, do_sample=False, **stop)
        assert texts[i] == tokenizer.decode(own[0, hf["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert np.mean([t == q.answer for t, (_, q) in zip(texts, pairs, strict=True)]) >= least_right, texts
    config = model.config
    assert flops_image_size(ModelSpec(path), config) == ((64, 64) if variant == "qwen" else (128, 128))
    wide = processor(text=["<|image_pad|>"], images=[np.zeros((64, 128, 3), np.uint8)])["image_grid_thw"][0]
    expected = tuple(int(n) * config.vision_config.patch_size for n in wide[1:])  # its processor's own resize
    assert flops_image_size(ModelSpec(path, flops_image_size=(64, 128)), config) == expected
    assert (expected == (64, 128)) == (variant == "qwen_hires")  # the high-resolution model reads it unresized
    bounded = ModelSpec(path, processor_options=(("min_pixels", 16 * 16), ("max_pixels", 32 * 32)))
    assert flops_image_size(bounded, config) == (32, 32)
