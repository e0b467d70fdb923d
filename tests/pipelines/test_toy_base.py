"""Which trained toy base model the jobs use: the one trained for the current toy world, never a stale one."""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvpruning.tiny import build_processor
from pipelines.toy.base import SHIPPED_BASE_MODEL, SHIPPED_BASE_MODELS, WORLD_STAMP, ToyWorld
from pipelines.toy.model import build_toy_model, save_toy_model, toy_config, toy_processor
from pipelines.toy.scenes import SceneSpec, toy_words
from pipelines.toy.writer import FORMAT_VERSION, ToyWorldPaths, scene_parameters, world_spec

ROOT = Path(__file__).resolve().parents[2]


def world_at(root: Path, spec: SceneSpec | None = None) -> ToyWorld:
    return ToyWorld(ToyWorldPaths.under(root / "world"), root, seed=0, spec=spec or SceneSpec())


def fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llava"}')  # the toy LLaVA's
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("variant", ["default", "hires", "qwen", "qwen_hires"])
def test_shipped_base_models_were_trained_for_their_worlds(variant):
    """Changing a toy world (its format or spec defaults) needs its shipped model retrained."""
    stamp = json.loads((SHIPPED_BASE_MODELS[variant] / WORLD_STAMP).read_text())
    assert stamp == scene_parameters(world_spec(variant, None))
    assert stamp["format_version"] == FORMAT_VERSION


def test_a_local_base_model_is_used_only_once_stamped_for_this_world(tmp_path, caplog):
    world = world_at(tmp_path)
    fake_model(world.base_model)
    with caplog.at_level(logging.WARNING):
        assert world.trained_base() == SHIPPED_BASE_MODEL  # unstamped: e.g. a run that died while exporting
    assert str(world.base_model) in caplog.text and WORLD_STAMP in caplog.text

    world.stamp_base_model()
    assert world.trained_base() == world.base_model
    # the same files under a world drawn differently (another version of the toy world): neither model fits
    other = world_at(tmp_path, SceneSpec(max_objects=2))
    assert other.trained_base() is None
    # the same world's root read by the toy Qwen2.5-VL's variant: a toy LLaVA is not its model, the shipped one is
    qwen = ToyWorld.at(tmp_path, world.seed, variant="qwen")
    assert qwen.spec == world.spec and qwen.family == "qwen2_5_vl"
    with caplog.at_level(logging.WARNING):
        assert qwen.trained_base() == SHIPPED_BASE_MODELS["qwen"]
    assert "a llava, not this world's toy model" in caplog.text


def test_no_base_model_without_weights(tmp_path):
    world = world_at(tmp_path, SceneSpec(max_objects=2))
    (world.base_model).mkdir(parents=True)
    world.stamp_base_model()  # a stamp alone is not a model
    assert world.trained_base() is None


def test_a_continued_model_keeps_its_weights_and_learns_the_new_words(tmp_path):
    """``train.init_from``: a model saved by an older world (fewer words) gets this world's processor."""
    model = build_toy_model()
    older = build_processor(model.config, words=toy_words()[:-2])  # before "bigger" and "than"
    saved = save_toy_model(tmp_path / "older", model, older)
    continued = world_at(tmp_path).continued_model(saved)
    tokenizer = AutoProcessor.from_pretrained(continued).tokenizer
    assert tokenizer.get_vocab() == toy_processor().tokenizer.get_vocab()
    assert {w: tokenizer.get_vocab()[w] for w in older.tokenizer.get_vocab()} == older.tokenizer.get_vocab()
    assert tokenizer.unk_token_id not in tokenizer("Is the ring bigger than the cross?").input_ids
    again = LlavaForConditionalGeneration.from_pretrained(continued).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())

    shuffled = build_processor(model.config, words=toy_words()[::-1])  # same words, other ids
    other = save_toy_model(tmp_path / "shuffled", model, shuffled)
    with pytest.raises(ValueError, match="other ids"):
        world_at(tmp_path / "second").continued_model(other)


def test_the_hires_world_continues_the_shipped_toy_llava_as_a_toy_llava_next(tmp_path):
    """``data.toy_variant: hires``: the toy LLaVA-NeXT of the same sizes, every weight of the shipped toy LLaVA carried
    over (its tower reads the same 64 x 64 views) but the patch embedding, which reads only the even pixels of each
    patch (a checkerboard's color) at twice the weight; the newline new, the old words' ids kept, the tiles' vision
    tokens those of HF's own model for the world's images."""
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration

    from pipelines.conversation import encode, parse_turns, prompt_template, render
    from pipelines.toy.hires import HiresSpec

    world = ToyWorld.at(tmp_path, seed=0, variant="hires")
    assert isinstance(world.spec, HiresSpec) and world.trained_base() == SHIPPED_BASE_MODELS["hires"]
    path = world.continued_model(SHIPPED_BASE_MODEL)
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    base = LlavaForConditionalGeneration.from_pretrained(SHIPPED_BASE_MODEL)
    carried = dict(base.state_dict())
    patch = "model.vision_tower.embeddings.patch_embedding.weight"
    for name, value in model.state_dict().items():
        if "image_newline" not in name and name != patch:
            assert torch.equal(value, carried.pop(name)), name
    assert list(carried) == [patch]
    old_conv, new_conv = (
        base.model.vision_tower.embeddings.patch_embedding,
        model.model.vision_tower.embeddings.patch_embedding,
    )
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=g)
    y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    odd = (y + x) % 2 == 1
    other = torch.where(odd, torch.randn(2, 3, 64, 64, generator=g), image)  # the same even pixels
    evens_doubled = torch.where(odd, 0.0, 2 * image)
    with torch.no_grad():
        torch.testing.assert_close(new_conv(image), new_conv(other))
        torch.testing.assert_close(new_conv(image), old_conv(evens_doubled))
    processor = AutoProcessor.from_pretrained(path)
    old = AutoProcessor.from_pretrained(SHIPPED_BASE_MODEL).tokenizer.get_vocab()
    assert all(processor.tokenizer.get_vocab()[w] == i for w, i in old.items())
    turns = parse_turns(
        [{"from": "human", "value": "<image>\nwhat color is the ring?"}, {"from": "gpt", "value": "red"}]
    )
    row = encode(processor, render(turns, prompt_template(processor)), Image.new("RGB", (128, 128)))
    assert row["pixel_values"].shape == (5, 3, 64, 64)
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=torch.from_numpy(row["pixel_values"])[None], image_sizes=torch.tensor([[128, 128]])
        ).pooler_output[0]
    assert int((row["input_ids"] == model.config.image_token_id).sum()) == packed.shape[0] == 336
    init = world.init_model()
    assert isinstance(LlavaNextForConditionalGeneration.from_pretrained(init), LlavaNextForConditionalGeneration)
    shipped = SHIPPED_BASE_MODELS["hires"]  # a toy LLaVA-NeXT stamped for this world goes on as it is
    again = LlavaNextForConditionalGeneration.from_pretrained(world.continued_model(shipped)).state_dict()
    assert all(
        torch.equal(again[k], v)
        for k, v in LlavaNextForConditionalGeneration.from_pretrained(shipped).state_dict().items()
    )
    with pytest.raises(ValueError, match="unknown toy world variant 'huge'"):
        ToyWorld.at(tmp_path, seed=0, variant="huge")


def test_the_large_world_is_read_by_the_hires_model_given_its_grid(tmp_path):
    """The large-image world has no base model of its own: the high-resolution world's (shipped) weights as they
    are, its config and processor given the 4 x 4 grid, stamped for the large world, written once and reused; a
    256 x 256 image is then every full-resolution tile (1,120 vision tokens), as Hugging Face's own model packs it."""
    import numpy as np
    from transformers import LlavaNextForConditionalGeneration

    from pipelines.toy.hires import vision_tokens

    world = ToyWorld.at(tmp_path, seed=0, variant="large")
    path = world.trained_base()
    assert path == tmp_path / "hires_model" and world.trained_base() == path
    shipped = SHIPPED_BASE_MODELS["hires"]
    assert (path / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert (
        json.loads((path / WORLD_STAMP).read_text())
        == scene_parameters(world.spec)
        != scene_parameters(world_spec("hires"))
    )
    processor = AutoProcessor.from_pretrained(path)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    inputs = processor(
        images=[image], text=["USER: <image>\nIs there a ring in the image? ASSISTANT:"], return_tensors="pt"
    )
    assert (inputs["input_ids"] == processor.image_token_id).sum() == vision_tokens(world.spec, 256, 256) == 1120
    assert inputs["pixel_values"].shape[1] == 1 + 16  # the base view and 16 tiles
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():  # HF checks that the image's features fill its 1,120 placeholders
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]

    from pipelines.toy.base import widened_grid

    retrained = tmp_path / "retrained"  # another source (e.g. a hires model trained here): the copy is remade
    retrained.mkdir()
    for f in shipped.iterdir():
        (retrained / f.name).write_bytes(f.read_bytes())
    state = model.state_dict()
    state = {k: v + 1.0 if "lm_head" in k else v for k, v in state.items()}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, retrained / "model.safetensors")
    assert widened_grid(retrained, world.spec, path) == path
    assert (path / "model.safetensors").read_bytes() == (retrained / "model.safetensors").read_bytes()


def test_the_qwen_hires_world_continues_the_default_worlds_toy_qwen_reading_checkerboards(tmp_path):
    """``data.toy_variant: qwen_hires``: the high-resolution world in its three aspects, read by the toy Qwen2.5-VL of
    the default world continued (every weight carried over but the patch embedding, which reads only the even pixels
    of each patch of both frames, at twice the weight); each image whole at its own size (128 x 128: 256 vision
    tokens, 64 x 128: 128), as Hugging Face's own model counts them."""
    import numpy as np
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipelines.conversation import load_processor
    from pipelines.toy.hires import HiresSpec

    world = ToyWorld.at(tmp_path, seed=0, variant="qwen_hires")
    assert isinstance(world.spec, HiresSpec) and world.family == "qwen2_5_vl"
    assert world.spec.aspects == ("square", "wide", "tall")
    path = world.continued_model(SHIPPED_BASE_MODELS["qwen"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(SHIPPED_BASE_MODELS["qwen"])
    carried = dict(base.state_dict())
    patch = "model.visual.patch_embed.proj.weight"
    for name, value in model.state_dict().items():
        if name != patch:
            assert torch.equal(value, carried.pop(name)), name
    assert list(carried) == [patch]
    old_conv, new_conv = base.model.visual.patch_embed.proj, model.model.visual.patch_embed.proj
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(7, *old_conv.weight.shape[1:], generator=g)  # (patches, 3, frames, 4, 4)
    y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    odd = (y + x) % 2 == 1  # patches start on even pixels: 4-pixel patches of images of even sizes
    other = torch.where(odd, torch.randn(patches.shape, generator=g), patches)
    with torch.no_grad():
        torch.testing.assert_close(new_conv(patches), new_conv(other))
        torch.testing.assert_close(new_conv(patches), old_conv(torch.where(odd, 0.0, 2 * patches)))
    trained = save_toy_model(tmp_path / "trained", model, load_processor(str(path)))  # as if trained on this world
    (trained / WORLD_STAMP).write_text(json.dumps(scene_parameters(world.spec)))
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(world.continued_model(trained))
    assert torch.equal(again.model.visual.patch_embed.proj.weight, new_conv.weight)  # reads checkerboards already

    processor = load_processor(str(path))
    rng = np.random.default_rng(0)
    for (height, width), tokens in (((128, 128), 256), ((64, 128), 128), ((128, 64), 128)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a ring?"}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [[1, height // 4, width // 4]]  # unresized
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
        with torch.no_grad():  # HF checks that the image's features fill its placeholders
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_every_toy_variant_has_its_family_its_base_config_and_a_shipped_model():
    """``jobs/train.py`` trains a variant's base model by itself from ``BASE_CONFIGS`` when none fits: each config
    validates, is a ``base`` stage of that variant (the large world borrows the high-resolution world's, run with
    ``data.toy_variant=large``) and starts from a model that is there; every variant but the large one ships a base
    model of its own family."""
    from pipelines.config import load_config
    from pipelines.toy.model import VARIANT_FAMILIES
    from pipelines.toy.writer import VARIANTS
    from pipelines.train.experiment import BASE_CONFIGS

    assert set(BASE_CONFIGS) == set(VARIANT_FAMILIES) == set(VARIANTS)
    assert set(SHIPPED_BASE_MODELS) == set(VARIANTS) - {"large"}
    for variant in VARIANTS:
        cfg = load_config(BASE_CONFIGS[variant])
        assert cfg.train.stage == "base"
        assert cfg.data.toy_variant == ("hires" if variant == "large" else variant)
        assert cfg.train.init_from is None or (ROOT / cfg.train.init_from / "model.safetensors").is_file()
        shipped = SHIPPED_BASE_MODELS[cfg.data.toy_variant]
        model_type = json.loads((shipped / "config.json").read_text())["model_type"]
        assert model_type == toy_config(world_spec(variant), VARIANT_FAMILIES[variant]).model_type
