"""LRS-VQA's pyramid (method ``lrs_vqa``) in the evaluation's one pass, beside the other settings: each answer is
the one ``PyramidModel.generate`` gives the question alone, from the prompt with its image token unexpanded and the
whole image normalised by hand; each answer records the tiles its prefill encoded and its prompt lengths, which
the FLOPs count (FlopCounterMode) of that prefill confirms; the evaluation's metrics and the config's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from lvpruning import from_pretrained
from lvpruning.flops import count_flops
from lvpruning.lrs_vqa import PyramidModel, pyramid_flops
from lvpruning.region_focus import RegionFocusModule, load_region_focus, save_region_focus
from pipelines.config import JobConfig
from pipelines.eval.evaluation import PAPER_TEXT_TOKENS, make_settings, pyramid_metrics, settings_tflops
from pipelines.eval.inference import InferenceOptions, run_inference
from pipelines.eval.models import ModelSpec, Setting
from tests.pipelines.test_inference import SUFFIX, read_lines, write_tiny_world

pytestmark = pytest.mark.usefixtures("local_ray")

SIZES = [(64, 40), (48, 48), (20, 12), (16, 32), (40, 64)]  # several tiled levels at base 16, or one
PYRAMID = Setting("lrs_vqa", (0.2, 0.5), params={"base_long_side": 16})
OPTIONS = InferenceOptions(batch_size=3, max_new_tokens=4, num_actors=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny LLaVA-NeXT world of test_inference, a Region Focus Module saved beside it (its layers moved off the
    LLM's), and questions on images of several sizes larger than a tile."""
    root = tmp_path_factory.mktemp("pyramid_world")
    tiny = write_tiny_world(root, n_good=2, tiled=True)
    model = from_pretrained(str(tiny.model))
    torch.manual_seed(3)
    focus = RegionFocusModule(model, (2, 3))
    for p in focus.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    save_region_focus(focus, root / "region_focus")
    rng = np.random.default_rng(1)
    records = []
    for i, (height, width) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tiny.images / f"img/big{i}.png")
        text = f"what {('color', 'shape')[i % 2]} is the {'large ' * (i % 3)}circle?"
        records.append({"question_id": i, "image": f"img/big{i}.png", "text": text, "category": "color"})
    (root / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tiny, root / "region_focus", root / "big.jsonl", records


def alone(tiny, focus_dir: Path, record: dict) -> tuple[str, dict]:
    """One question through ``PyramidModel`` in this process: its prompt (the chat template of lvpruning.tiny, the
    image token unexpanded), the image rescaled and normalised by hand; the answer and what the prefill did."""
    processor = AutoProcessor.from_pretrained(tiny.model)
    tok, ip = processor.tokenizer, processor.image_processor
    model = from_pretrained(str(tiny.model)).eval()
    pyramid = PyramidModel(model, load_region_focus(model, focus_dir), base_long_side=16)
    prompt = f"USER: <image>\n{record['text']}\n{SUFFIX} ASSISTANT:"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    assert (ids == model.config.image_token_id).sum() == 1
    image = torch.tensor(np.array(Image.open(tiny.images / record["image"]).convert("RGB")), dtype=torch.float32)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    pixels = ((image / 255 - mean) / std).permute(2, 0, 1)[None]  # (1, 3, H, W)
    sizes = torch.tensor([list(image.shape[:2])])
    kwargs = {"image_sizes": sizes, "keep_ratios": PYRAMID.keep_ratios}
    with torch.no_grad():
        out = pyramid(ids, pixels, **kwargs)
        flops = count_flops(pyramid, {"input_ids": ids, "pixel_values": pixels}, **kwargs)
        tokens = pyramid.generate(
            ids, pixels, max_new_tokens=OPTIONS.max_new_tokens, eos_token_id=tok.eos_token_id, **kwargs
        )
    text = tok.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True).strip()
    record = {"tiles_encoded": int(out.tiles_encoded[0]), "tiles_finest": int(out.tiles_finest[0])}
    record |= {"vision_tokens": int(out.vision_tokens[0]), "rounds": out.rounds[0].tolist(), "flops": flops}
    return text, record


@pytest.mark.timeout(300)
def test_the_pyramid_answers_in_one_pass_as_it_does_alone(world, tmp_path):
    tiny, focus_dir, questions, records = world
    spec = ModelSpec(str(tiny.model), region_focus=str(focus_dir))
    files = {Setting("none"): tmp_path / "none.jsonl", PYRAMID: tmp_path / "pyramid.jsonl"}
    reports = run_inference("toy", str(questions), str(tiny.images), files, spec, OPTIONS)
    assert {name: r.generated for name, r in reports.items()} == {"none": 5, PYRAMID.name: 5}
    answers = read_lines(files[PYRAMID])
    assert "pyramid" not in read_lines(files[Setting("none")])[0]["metadata"]
    config = from_pretrained(str(tiny.model)).config
    for answer, record in zip(answers, records, strict=True):
        text, expected = alone(tiny, focus_dir, record)
        assert answer["text"] == text
        got = answer["metadata"]["pyramid"]
        assert got == {k: v for k, v in expected.items() if k != "flops"}
        assert sum(pyramid_flops(config, 2, got["rounds"], got["tiles_encoded"]).values()) == expected["flops"]
    tiles = [a["metadata"]["pyramid"] for a in answers]
    assert len({t["tiles_finest"] for t in tiles}) == 3  # one batch: 4 x 3, 3 x 3 and 1 x 2 finest levels
    assert any(t["tiles_encoded"] < 2 + t["tiles_finest"] for t in tiles)  # skipped tiles: global + coarse + some

    metrics = pyramid_metrics(spec, answers)
    flops = []
    for a in answers:  # the prompt's text counted as 30 tokens, the paper's convention
        got = a["metadata"]["pyramid"]
        text = got["rounds"][-1] - got["vision_tokens"]
        rounds = [n - text + PAPER_TEXT_TOKENS for n in got["rounds"]]
        flops.append(sum(pyramid_flops(config, 2, rounds, got["tiles_encoded"]).values()) / 1e12)
    assert metrics["tflops"] == pytest.approx(np.mean(flops), rel=1e-12)
    assert metrics["pyramid/tiles_encoded"] == np.mean([a["metadata"]["pyramid"]["tiles_encoded"] for a in answers])
    bound = settings_tflops(spec, [PYRAMID])[PYRAMID.name]  # at 672 x 672: more tiles than any of these images
    assert bound > max(flops)


def test_the_pyramid_is_configured_apart_and_bad_settings_are_named(world):
    tiny, focus_dir, _, _ = world
    config = JobConfig.model_validate(
        {"eval": {"lrs_vqa": {"region_focus": str(focus_dir), "keep_ratios": [[0.25, 0.25], [0.1]]}}}
    )
    settings = make_settings(["none"], [], 0, (), config.eval.lrs_vqa)
    assert [s.name for s in settings] == ["none", "lrs_vqa_0.25-0.25", "lrs_vqa_0.1"]
    with pytest.raises(ValueError, match="set eval.lrs_vqa"):
        JobConfig.model_validate({"eval": {"methods": ["none", "lrs_vqa"]}})
    with pytest.raises(ValueError, match=r"one share in \(0, 1\]"):
        JobConfig.model_validate({"eval": {"lrs_vqa": {"region_focus": "x", "keep_ratios": [[0.0, 0.5]]}}})
    with pytest.raises(ValueError, match="no layers"):
        Setting("lrs_vqa", (0.25, 0.25), layers=(0, 1))
    with pytest.raises(ValueError, match="needs a trained Region Focus Module"):
        settings_tflops(ModelSpec(str(tiny.model)), [PYRAMID])


def test_the_region_focus_stage_evaluates_the_pyramid_with_its_export(world, monkeypatch):
    """After ``train.stage: region_focus`` the job evaluates the base model alone and the pyramid with the module the
    stage exported (eval.lrs_vqa's shares, or the reference's), not decision modules."""
    from pipelines.config import load_config
    from pipelines.eval.evaluation import evaluated_model
    from pipelines.job import resolve

    tiny, focus_dir, _, _ = world
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = resolve(load_config("jobs/configs/toy_region_focus_large.yaml"))
    assert job.config.eval.methods == ("none",) and job.config.eval.lrs_vqa.base_long_side == 128
    spec = evaluated_model(job, model_path=str(tiny.model), modules=str(focus_dir))
    assert (spec.region_focus, spec.modules, spec.flops_image_size) == (str(focus_dir), None, (256, 256))
    settings = make_settings(job.config.eval.methods, (), 0, (), job.config.eval.lrs_vqa)
    assert [s.name for s in settings] == ["none", "lrs_vqa_0.25-0.25_base_long_side=128"]
    with pytest.raises(FileNotFoundError, match="not a saved Region Focus Module"):
        evaluated_model(job, model_path=str(tiny.model), modules=str(tiny.modules))  # decision modules, not one


def test_answers_of_another_region_focus_module_are_refused(world, tmp_path):
    """The pyramid's answers record the module they came from (path and weights' version): a pass with another
    module into the same folder fails naming it, before answering."""
    tiny, focus_dir, questions, _ = world
    other = tmp_path / "other_focus"
    model = from_pretrained(str(tiny.model))
    save_region_focus(RegionFocusModule(model, (1, 3)), other)
    files = {PYRAMID: tmp_path / "pyramid.jsonl"}
    options = InferenceOptions(batch_size=3, max_new_tokens=2, num_actors=1, max_questions=2)
    args = ("toy", str(questions), str(tiny.images), files)
    run_inference(*args, ModelSpec(str(tiny.model), region_focus=str(focus_dir)), options)
    assert read_lines(files[PYRAMID])[0]["metadata"]["modules"] == str(focus_dir)
    with pytest.raises(ValueError, match="use another folder"):
        run_inference(*args, ModelSpec(str(tiny.model), region_focus=str(other)), options)


def test_the_pyramid_is_refused_off_llava_next_before_any_work(monkeypatch):
    """eval.lrs_vqa on a LLaVA-1.5 fails at resolve, naming it; a region_focus stage on one evaluates the base model
    alone."""
    from pipelines.config import load_config
    from pipelines.job import resolve

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="eval.lrs_vqa: LRS-VQA's pyramid runs on LLaVA-NeXT"):
        resolve(load_config(None, ["eval.lrs_vqa={region_focus: x}"]))
    stage = ["train.stage=region_focus", "region_focus.layers=[2,3]", "region_focus.skipped=[]"]
    job = resolve(load_config(None, stage))
    assert job.config.eval.methods == ("none",) and job.config.eval.lrs_vqa is None
