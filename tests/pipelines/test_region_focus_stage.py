"""``train.stage: region_focus``: the worker's step on a collated batch of a tiny LLaVA-NeXT (Qwen2 decoder, images
of different sizes, right padding, two answer turns) equals LRS-VQA's recipe written out with the
``lvpruning.region_focus`` functions and Hugging Face's own forward; only the module learns, in fp32 and bf16; the
stage's export loads back; and its config keys fail before any cluster work."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from lvpruning.region_focus import (
    RegionFocusModule,
    answer_rows,
    distillation_loss,
    load_region_focus,
    teacher_logits,
)
from lvpruning.tiny import tiny_llava, tiny_tiled_config
from pipelines.config import load_config
from pipelines.job import resolve
from pipelines.stages import STAGES
from pipelines.train.collate import collate
from pipelines.train.worker import forward
from tests.lvpruning.conftest import IMAGE_TOKEN, VOCAB
from tests.lvpruning.test_tiled import vision_counts

LAYERS, SKIPPED = (2, 3, 4, 5), (1, 2)  # S_0 and S_3 distilled, as the 7B config's four layers
SIZES = [(32, 32), (20, 12), (16, 32)]  # (height, width): 88, 46 and 52 vision tokens, the base view's 16 first
PAD = 3


class Engine:
    """What ``worker.forward`` reads of DeepSpeed's engine: a call, and the trained ``module``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


def tiny_next(seed: int = 3):
    config = tiny_tiled_config("llava_next", "qwen2", num_layers=6, initializer_range=0.2)
    return tiny_llava(config, seed=seed)


def stage_config(overrides=()):
    return load_config(
        None,
        [
            "train.stage=region_focus",
            f"region_focus.layers={list(LAYERS)}",
            f"region_focus.skipped={list(SKIPPED)}",
            *overrides,
        ],
    )


def training_batch(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[BOS, 3 words, <image> x n_b, question, answer, question, answer]`` as ``pipelines.train.data`` makes
    them (answers supervised, everything else -100), collated with right padding."""
    g = torch.Generator().manual_seed(seed)
    tile = model.config.vision_config.image_size
    words = lambda n: torch.randint(10, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for b, (size, n) in enumerate(zip(SIZES, vision_counts(model, SIZES), strict=True)):
        prompt = [1, *words(3), *[IMAGE_TOKEN] * n, *words(4 + b)]
        first, question, second = words(2 + b), words(3), words(3 - b)
        input_ids = prompt + first + question + second
        labels = [-100] * len(prompt) + first + [-100] * len(question) + second
        tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, tile)
        rows.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": labels,
                "pixel_values": torch.randn(tiles, 3, tile, tile, generator=g).numpy(),
                "image_sizes": list(size),
            }
        )
    return collate(rows, PAD, "right")


def by_hand(model, batch, dtype=torch.float32):
    """The recipe written out: HF's forward (LM loss, hidden states), the rows before each answer, the frozen LLM's
    and a fresh module's logits there, and the loss on the image keys counted from HF's packing (each image's
    base view first: 16 tokens, the rest its tiles and newlines)."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    padding = attention_mask.bool()
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # right padding: 0, 1, ... on real tokens
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, position_ids=position_ids)
    rows, real = answer_rows(labels, padding)
    module = RegionFocusModule(model, LAYERS)
    student = module(out.hidden_states[0], position_ids, padding, rows)
    teacher = teacher_logits(model, LAYERS, out.hidden_states, position_ids, rows)
    vision = input_ids == IMAGE_TOKEN
    image = vision & (vision.long().cumsum(-1) > 16)  # past each image's 4 x 4 base view
    return distillation_loss(student, teacher, real, padding, image, SKIPPED), out.loss, module, rows


def test_the_stage_step_equals_the_recipe_written_out():
    model = tiny_next()
    batch = training_batch(model)
    assert batch["attention_mask"][1:].eq(0).any()  # right padding reached the shorter rows
    want, lm_loss, module, rows = by_hand(model, batch)
    assert rows.shape[1] == 2  # one row per answer turn
    stage = STAGES["region_focus"]
    trainable = stage.trainable(model, stage_config()).train()
    loss, metrics = forward(Engine(trainable), batch, stage)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["lm_loss"], lm_loss, atol=1e-6, rtol=1e-6)
    terms = torch.stack([metrics[f"distill/{t}"] for t in ("kl", "kl_image", "mse")])
    torch.testing.assert_close(terms.mean(), want.detach(), atol=1e-6, rtol=1e-5)
    assert loss > 1e-4 and all(t > 0 for t in terms)  # the copies' shallow stack differs from the deep LLM
    # The gradients are the written-out recipe's, and reach the module's copies only.
    loss.backward()
    want.backward()
    for (name, p), (_, q) in zip(trainable.region_focus.named_parameters(), module.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None and not p.requires_grad for p in trainable.model.parameters())
    last = trainable.region_focus.layers[-1]
    assert last.self_attn.k_proj.weight.grad.abs().sum() > 0 and not last.mlp.up_proj.weight.requires_grad
    # Mutation control: the image keys as the whole image (base view included) give another loss.
    vision = batch["input_ids"] == IMAGE_TOKEN
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    rows, real = answer_rows(batch["labels"], batch["attention_mask"].bool())
    position_ids = torch.arange(vision.shape[1]).expand_as(vision)
    S = module(out.hidden_states[0], position_ids, batch["attention_mask"].bool(), rows)
    T = teacher_logits(model, LAYERS, out.hidden_states, position_ids, rows)
    other = distillation_loss(S, T, real, batch["attention_mask"].bool(), vision, SKIPPED)
    assert not torch.isclose(other, want, rtol=1e-3)


def test_a_bf16_step_trains_the_module_alone_and_follows_fp32(tmp_path):
    model = tiny_next(seed=5)
    batch = training_batch(model, seed=1)
    stage, cfg = STAGES["region_focus"], stage_config()
    fp32, _ = forward(Engine(stage.trainable(model, cfg).train()), batch, stage)
    bf16_model = tiny_next(seed=5).bfloat16()
    frozen = {k: v.clone() for k, v in bf16_model.state_dict().items()}
    trainable = stage.trainable(bf16_model, cfg).train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    bf16_batch = batch | {"pixel_values": batch["pixel_values"].bfloat16()}
    loss, metrics = forward(Engine(trainable), bf16_batch, stage)
    assert loss.dtype == torch.float32 and all(bool(torch.isfinite(v)) for v in metrics.values())
    torch.testing.assert_close(loss, fp32.detach(), atol=0.05, rtol=0.05)
    loss.backward()
    optimizer.step()
    assert all(bool(p.grad.isfinite().all()) and p.grad.abs().sum() > 0 for p in params)  # S_3 reaches each one
    # The matrices move (a norm's 1.0 is too coarse in bf16 for one step: DeepSpeed keeps fp32 masters for that).
    assert all(not torch.equal(p, q) for p, q in zip(params, before, strict=True) if p.ndim == 2)
    assert all(torch.equal(v, bf16_model.state_dict()[k]) for k, v in frozen.items())
    assert trainable.model.training is False and trainable.region_focus.training
    # The export: safetensors + JSON that load back onto the base model, the trained weights with them.
    stage.save(trainable, tmp_path / stage.export_dir, "unused")
    loaded = load_region_focus(tiny_next(seed=5).bfloat16(), tmp_path / stage.export_dir)
    for (name, p), q in zip(trainable.region_focus.layers.state_dict().items(), loaded.layers.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stage=region_focus"], "give them"),
        (["train.stage=region_focus", "region_focus.layers=[0,2]"], "region_focus.layers"),
        (["train.stage=region_focus", "region_focus.layers=[2,1]"], "increasing"),
        (["train.stage=region_focus", "region_focus.layers=[1,3,5]"], "S_2"),  # the score's, skipped by default
        (["train.stage=region_focus", "region_focus.layers=[1,2,3]", "region_focus.skipped=[]"], "nothing to learn"),
        (["train.stage=region_focus", "region_focus.layers=[2]", "region_focus.skipped=[-1]"], "skipped"),
        (["train.stage=region_focus", "region_focus.layers=[2]", "train.gradient_checkpointing=true"], "checkpoint"),
        (["train.stage=region_focus", "region_focus.layers=[2]", "region_focus.temperature=0"], "temperature"),
        (["train.stage=region_focus", "region_focus.layer=[1]"], "region_focus.layer"),
    ],
)
def test_impossible_region_focus_keys_fail_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_layers_beyond_the_models_depth_fail_at_resolve(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ok = resolve(load_config(None, ["data.toy_variant=hires", "train.stage=region_focus", "region_focus.layers=[3]"]))
    assert ok.config.region_focus.layers == (3,) and ok.num_layers == 4
    cfg = load_config(None, ["data.toy_variant=hires", "train.stage=region_focus", "region_focus.layers=[4]"])
    with pytest.raises(ValueError, match=r"region_focus.layers \(toy\).*the last < 4"):
        resolve(cfg)
    qwen = load_config(None, ["data.toy_variant=qwen", "train.stage=region_focus", "region_focus.layers=[2]"])
    with pytest.raises(ValueError, match="supports .*llava_next.* is a qwen2_5_vl"):
        resolve(qwen)
