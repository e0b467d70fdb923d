"""Ray Data batch inference: the actor pool on 2 CPUs, parity with direct generation, skipped images, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from lvpruning import PruningConfig, attach, from_pretrained, load_decision_modules, save_decision_modules
from lvpruning.policies import get_policy
from lvpruning.tiny import (
    build_processor,
    build_tokenizer,
    tiny_llava,
    tiny_llava_config,
    tiny_tiled_config,
)
from pipelines.eval.inference import (
    InferenceOptions,
    InferenceReport,
    Preprocessor,
    answer_signature,
    question_text,
    read_answers,
    read_questions,
    run_inference,
)
from pipelines.eval.models import ModelSpec, Setting, load_settings, timed_generate
from tests.bad_bytes import SEEDS, not_utf8, not_utf8_problem

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SUFFIX = "Answer the question using a single word or phrase."
WORDS = "what color shape size is the circle square red blue green small large".split()
RATIOS = (0.5, 0.25)
OPTIONS = InferenceOptions(batch_size=3, max_new_tokens=4, num_actors=2)


@dataclass(frozen=True)
class TinyWorld:
    """A tiny LLaVA (random weights) with decision modules, and a toy-format benchmark: the last two questions
    have a missing and a corrupt image."""

    model: Path
    modules: Path
    questions: Path
    truth: Path
    images: Path
    n_good: int
    tiled: bool = False

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.questions.read_text().splitlines()]


def write_tiny_world(root: Path, n_good: int = 8, tiled: bool = False) -> TinyWorld:
    """The tiny world; ``tiled``: a tiny LLaVA-NeXT and images of several sizes (different numbers of tiles)."""
    config = tiny_tiled_config() if tiled else tiny_llava_config()
    n_fill = config.text_config.vocab_size - len(build_tokenizer(WORDS))  # every id decodes to a word
    words = WORDS + [f"filler{i}" for i in range(n_fill)]
    processor = build_processor(config, words) if tiled else build_processor(config, words)
    model = tiny_llava(config, seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    torch.manual_seed(1)
    pruning = PruningConfig(layers=(0, 1), train_ratios=RATIOS, infer_ratios=RATIOS, num_heads=4)
    save_decision_modules(attach(model, pruning), root / "modules")

    rng = np.random.default_rng(0)
    (root / "images" / "img").mkdir(parents=True)
    questions, truth = [], []
    categories = ("color", "shape")
    for i in range(n_good):
        # some non-square images: padded to a square first (LLaVA-1.5), or cut into other numbers of tiles
        height, width = [(32, 32), (20, 12), (16, 32), (32, 16)][i % 4] if tiled else (32 if i % 2 else 24, 32)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img/{i}.png")
        text = f"what {categories[i % 2]} is the {'large ' * (i % 3)}circle?"  # prompts of several lengths
        questions.append({"question_id": i, "image": f"img/{i}.png", "text": text, "category": categories[i % 2]})
        truth.append({"question_id": i, "answer": ["red", "circle"][i % 2], "category": categories[i % 2]})
    (root / "images" / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n not an image")
    for qid, image in ((n_good, "img/missing.png"), (n_good + 1, "img/corrupt.png")):
        questions.append({"question_id": qid, "image": image, "text": "what color is the square?", "category": "color"})
        truth.append({"question_id": qid, "answer": "red", "category": "color"})
    for name, records in (("questions.jsonl", questions), ("truth.jsonl", truth)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return TinyWorld(
        root / "model", root / "modules", root / "questions.jsonl", root / "truth.jsonl", root / "images", n_good, tiled
    )


pytestmark = pytest.mark.usefixtures("local_ray")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answer_alone(
    world: TinyWorld, spec: ModelSpec, setting: Setting, answers: Path, options: InferenceOptions = OPTIONS
) -> InferenceReport:
    """One setting's own pass (the per-setting path)."""
    reports = run_inference("toy", str(world.questions), str(world.images), {setting: answers}, spec, options)
    assert list(reports) == [setting.name]
    return reports[setting.name]


def direct_answers(world: TinyWorld, setting: Setting, records: list[dict]) -> dict[int, str]:
    """The same questions through ``pruner.generate`` (or HF ``generate``) in this process, one at a time."""
    processor = AutoProcessor.from_pretrained(world.model)
    tok = processor.tokenizer
    model = from_pretrained(str(world.model)).eval()
    pruner = load_decision_modules(model, world.modules).eval() if setting.method != "none" else None
    out = {}
    for r in records:
        image = Image.open(world.images / r["image"]).convert("RGB")
        if world.tiled:  # the processor's chat template (lvpruning.tiny's), the image as it is
            prompt, square = f"USER: <image>\n{r['text']}\n{SUFFIX} ASSISTANT:", image
        else:
            side = max(image.size)
            mean = tuple(int(x * 255) for x in processor.image_processor.image_mean)
            square = Image.new("RGB", (side, side), mean)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            prompt = f"{SYSTEM} USER: <image>\n{r['text']}\n{SUFFIX} ASSISTANT:"
        enc = processor(text=[prompt], images=[square], return_tensors="pt")
        kwargs = {"attention_mask": enc["attention_mask"], "max_new_tokens": OPTIONS.max_new_tokens}
        kwargs |= {"image_sizes": enc["image_sizes"]} if world.tiled else {}
        kwargs |= {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if pruner is None:
            tokens = model.generate(enc["input_ids"], pixel_values=enc["pixel_values"], do_sample=False, **kwargs)
        else:
            policy = get_policy(setting.method, setting.seed, decision_modules=pruner.decision_modules)
            tokens = pruner.generate(enc["input_ids"], enc["pixel_values"], keep_ratios=RATIOS, policy=policy, **kwargs)
        out[r["question_id"]] = tok.decode(tokens[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return out


@pytest.fixture(scope="module")
def learned_run(world, tmp_path_factory):
    answers = tmp_path_factory.mktemp("answers") / "toy.jsonl"
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    report = answer_alone(world, spec, Setting("lvpruning", RATIOS), answers)
    return report, read_lines(answers)


@pytest.mark.timeout(300)  # a stalled actor pool fails here instead of hanging CI
def test_actor_pool_answers_match_direct_generation(world, learned_run):
    report, answers = learned_run
    assert report.generated == world.n_good and report.resumed == 0
    expected = direct_answers(world, Setting("lvpruning", RATIOS), world.records()[: world.n_good])
    assert {a["question_id"]: a["text"] for a in answers} == expected
    assert any(expected.values()), "the tiny model should say something for at least one question"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setting", [Setting("none"), Setting("lvpruning", RATIOS)])
def test_a_tiled_model_answers_images_of_different_sizes_as_direct_generation(tiled_world, tmp_path_factory, setting):
    """LLaVA-NeXT through the Ray Data pipeline: images of 5 and 3 tiles in one batch (different numbers of vision
    tokens), prompts from the processor's chat template; each answer is the one generated for it alone."""
    world = tiled_world
    answers = tmp_path_factory.mktemp("answers") / "toy.jsonl"
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    report = answer_alone(world, spec, setting, answers)
    assert report.generated == world.n_good and report.skipped == {"missing_image": 1, "corrupt_image": 1}
    expected = direct_answers(world, setting, world.records()[: world.n_good])
    assert {a["question_id"]: a["text"] for a in read_lines(answers)} == expected
    assert any(expected.values())


@pytest.fixture(scope="module")
def tiled_world(tmp_path_factory) -> TinyWorld:
    return write_tiny_world(tmp_path_factory.mktemp("tiled_world"), tiled=True)


def test_answers_are_in_llava_format_with_settings_and_latency(world, learned_run):
    _, answers = learned_run
    assert [a["question_id"] for a in answers] == list(range(world.n_good))  # question order (POPE needs it)
    assert len({a["answer_id"] for a in answers}) == len(answers)
    for a in answers:
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"].endswith(f"?\n{SUFFIX}") and a["model_id"] == "model"
        meta = a["metadata"]
        assert meta["method"] == "lvpruning" and meta["keep_ratios"] == list(RATIOS)
        assert meta["modules"] == str(world.modules) and meta["model"] == str(world.model)
        assert meta["benchmark"] == "toy"
        assert 0 < meta["prefill_ms"] <= meta["e2e_ms"] and 1 <= meta["batch_size"] <= OPTIONS.batch_size


def test_missing_and_corrupt_images_are_counted_not_fatal(world, learned_run):
    report, answers = learned_run
    assert report.skipped == {"missing_image": 1, "corrupt_image": 1}
    assert sorted(report.skipped_ids) == [world.n_good, world.n_good + 1]
    assert world.n_good not in {a["question_id"] for a in answers}


@pytest.mark.timeout(300)
def test_resume_generates_only_the_rest(world, tmp_path):
    answers, spec, setting = tmp_path / "toy.jsonl", ModelSpec(str(world.model)), Setting("none")
    half = world.n_good // 2
    first = answer_alone(world, spec, setting, answers, dataclasses.replace(OPTIONS, max_questions=half))
    assert (first.generated, first.resumed) == (half, 0)
    before = {a["question_id"]: a["answer_id"] for a in read_lines(answers)}
    with open(answers, "a") as f:
        f.write('{"question_id": 5, "prompt": "torn by a k')  # a run killed in the middle of a line

    second = answer_alone(world, spec, setting, answers)
    assert (second.resumed, second.generated) == (half, world.n_good - half)
    final = read_lines(answers)
    ids = [a["question_id"] for a in final]
    assert ids == list(range(world.n_good))  # complete, no duplicates, in question order
    assert {q: a["answer_id"] for q, a in ((a["question_id"], a) for a in final) if q in before} == before
    assert {a["question_id"]: a["text"] for a in final} == direct_answers(
        world, setting, world.records()[: world.n_good]
    )

    third = answer_alone(world, spec, setting, answers)
    assert third.generated == 0 and third.resumed == world.n_good  # only the two bad images are tried again


def test_answers_of_another_setting_are_refused(tmp_path):
    spec, setting = ModelSpec("/models/llava"), Setting("random", (0.5,))
    signature = answer_signature(spec, setting)
    meta = {k: v for k, v in signature.items() if k != "model_id"}
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": "red", "model_id": "llava", "metadata": meta}) + "\n")
    assert set(read_answers(path, signature)) == {"1"}
    resized = ModelSpec("/models/llava", processor_options=(("max_pixels", 4096), ("min_pixels", 256)))
    assert answer_signature(resized, setting)["processor"] == {"max_pixels": 4096, "min_pixels": 256}
    for other in (
        answer_signature(spec, Setting("fastv", (0.5,))),
        answer_signature(ModelSpec("/x/llava"), setting),
        answer_signature(resized, setting),  # Qwen-VL's images at other sizes
    ):
        with pytest.raises(ValueError, match="use another folder"):
            read_answers(path, other)


@pytest.mark.parametrize("seed", SEEDS)
def test_question_and_answer_lines_that_are_not_utf8_name_file_and_line(tmp_path, seed):
    bad = not_utf8(seed)
    questions = tmp_path / "questions.jsonl"
    questions.write_bytes(b'{"question_id": 1, "text": "red?"}\n\n' + bad + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{questions}:3: {not_utf8_problem(bad)}")):
        read_questions(str(questions))
    questions.write_bytes(b'{"question_id": 1, "text": "red?"}\n{"question_id": 2\n')
    with pytest.raises(ValueError, match=re.escape(f"{questions}:2:18: not valid JSON")):
        read_questions(str(questions))
    spec, setting = ModelSpec("/models/llava"), Setting("random", (0.5,))
    signature = answer_signature(spec, setting)
    meta = {k: v for k, v in signature.items() if k != "model_id"}
    answers = tmp_path / "answers.jsonl"
    good = json.dumps({"question_id": 1, "text": "red", "model_id": "llava", "metadata": meta}).encode()
    answers.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{answers}:2: {not_utf8_problem(bad)}")):
        read_answers(answers, signature)


def test_answers_of_an_earlier_model_trained_into_the_same_folder_are_refused(tmp_path):
    """Retraining decision modules (or a toy base model) into the same folder must not reuse the old answers."""
    modules = tmp_path / "pruning"
    modules.mkdir()
    weights = modules / "decision_modules.safetensors"
    weights.write_bytes(b"first")
    spec, setting = ModelSpec("llava-hf/llava-1.5-7b-hf", modules=str(modules)), Setting("lvpruning", (0.5,))
    signature = answer_signature(spec, setting)
    assert signature["model_version"] is None and signature["modules_version"] is not None  # a hub id: its name
    meta = {k: v for k, v in signature.items() if k != "model_id"}
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": "red", "model_id": spec.model_id, "metadata": meta}) + "\n")
    assert set(read_answers(path, answer_signature(spec, setting))) == {"1"}  # same weights: resumed
    assert answer_signature(spec, Setting("none"))["modules_version"] is None  # no modules without pruning
    weights.write_bytes(b"second")
    os.utime(weights, ns=(1, 1))  # whatever the clock's resolution, the retrained file differs
    with pytest.raises(ValueError, match="use another folder"):
        read_answers(path, answer_signature(spec, setting))


def test_settings_and_prompts():
    assert Setting("lvpruning", [0.5, 0.3]).name == "lvpruning_0.5-0.3"
    assert Setting("none").name == "none" and Setting("random", (0.5,), seed=3).metadata()["seed"] == 3
    with pytest.raises(ValueError, match="keep_ratios"):
        Setting("none", (0.5,))
    for ratios in (None, []):
        with pytest.raises(ValueError, match="keep_ratios"):
            Setting("fastv", ratios)
    with pytest.raises(ValueError, match="unknown method 'oracle'"):
        Setting("oracle", (0.5,))
    with_suffix = question_text("toy", {"text": f"what color?\n{SUFFIX}"})
    assert with_suffix == question_text("toy", {"text": "what color?"}) == f"what color?\n{SUFFIX}"
    assert question_text("gqa", {"text": "what color?"}) == f"what color?\n{SUFFIX}"


# ------------------------------------------------------------------ one pass, every setting

SETTINGS = (
    Setting("none"),
    Setting("lvpruning", RATIOS),
    Setting("random", RATIOS, seed=3),
    Setting("fastv", RATIOS),
    Setting("visionzip", (0.5,), layers=(-1,)),
    Setting("transprune", (0.5, 0.25)),
)


def answer_texts(path: Path) -> dict[int, str]:
    lines = read_lines(path)
    assert len({a["question_id"] for a in lines}) == len(lines), f"{path}: an answer written twice"
    return {a["question_id"]: a["text"] for a in lines}


@pytest.fixture(scope="module")
def alone(world) -> dict[str, dict[int, str]]:
    """Each setting alone, in this process, without Ray: its own freshly loaded model and policy, one question at a
    time (batched = alone is the engine's guarantee, tested in tests/lvpruning)."""
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    pre = Preprocessor(spec.processor(), str(world.images))
    out = {}
    for s in SETTINGS:
        (model, policy), out[s.name] = load_settings(spec, [s])[s.name], {}
        for r in world.records()[: world.n_good]:
            request = pre.request(question_text("toy", r), r["image"])
            images = {k: [v] for k, v in request.items() if k != "input_ids"}
            texts, _, _ = timed_generate(
                model, pre.processor.tokenizer, [request["input_ids"]], images, s, policy, OPTIONS.max_new_tokens
            )
            out[s.name][r["question_id"]] = texts[0]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_pass_answers_every_setting_as_its_own_pass(world, alone, tmp_path, batch_size):
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    files = {s: tmp_path / s.name / "toy.jsonl" for s in SETTINGS}
    options = dataclasses.replace(OPTIONS, batch_size=batch_size)
    reports = run_inference("toy", str(world.questions), str(world.images), files, spec, options)
    assert list(reports) == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert reports[s.name].generated == world.n_good and reports[s.name].resumed == 0
        assert reports[s.name].skipped == {"missing_image": 1, "corrupt_image": 1}
        assert answer_texts(files[s]) == alone[s.name], s.name
        assert {a["metadata"]["method"] for a in read_lines(files[s])} == {s.method}
    assert len({tuple(alone[s.name].values()) for s in SETTINGS}) > 2  # the settings answer differently


@pytest.mark.timeout(600)
def test_a_pass_resumes_each_setting_from_its_own_file(world, alone, tmp_path):
    """Settings answered to different points (half, half with a torn last line, none): one pass writes exactly
    what each lacks, keeps every earlier answer and gives what each setting gives alone."""
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    settings = SETTINGS[:3]
    files = {s: tmp_path / s.name / "toy.jsonl" for s in settings}
    n, h = world.n_good, world.n_good // 2
    first = run_inference(
        "toy", str(world.questions), str(world.images), files, spec, dataclasses.replace(OPTIONS, max_questions=h)
    )
    assert {name: r.generated for name, r in first.items()} == {s.name: h for s in settings}
    before = {s: {a["question_id"]: a["answer_id"] for a in read_lines(files[s])} for s in settings[:2]}
    with open(files[settings[1]], "a") as f:
        f.write('{"question_id": 7, "prompt": "torn by a k')  # killed in the middle of a line
    files[settings[2]].unlink()

    reports = run_inference("toy", str(world.questions), str(world.images), files, spec, OPTIONS)
    got = {name: (r.resumed, r.generated) for name, r in reports.items()}
    assert got == {settings[0].name: (h, n - h), settings[1].name: (h, n - h), settings[2].name: (0, n)}
    for s in settings:
        assert answer_texts(files[s]) == alone[s.name], s.name
    for s, ids in before.items():
        assert {a["question_id"]: a["answer_id"] for a in read_lines(files[s]) if a["question_id"] in ids} == ids


def generator_actors() -> list[int]:
    """The pids of the running answer actors (Ray Data's map workers of :class:`Generator`), by process title."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"MapBatches(Generator)" in title:
            pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(600)
def test_an_actor_killed_mid_pass_loses_no_answer_and_writes_none_twice(world, alone, tmp_path):
    """SIGKILL an answering actor once the first batch of answers is on disk: Ray Data restarts it and the pass
    goes on; every file ends complete, each answer once, the answers written before the kill kept."""
    spec = ModelSpec(str(world.model), modules=str(world.modules))
    files = {s: tmp_path / s.name / "toy.jsonl" for s in SETTINGS}
    options = dataclasses.replace(OPTIONS, batch_size=1)
    killed: list[int] = []
    kept: dict[int, str] = {}

    def kill_once_answers_are_written() -> None:
        first = files[SETTINGS[0]]
        for _ in range(6000):
            if first.exists() and first.read_text().count("\n") >= 1 and generator_actors():
                kept.update({a["question_id"]: a["answer_id"] for a in read_lines(first)})
                pid = generator_actors()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_once_answers_are_written, daemon=True)
    watcher.start()
    reports = run_inference("toy", str(world.questions), str(world.images), files, spec, options)
    watcher.join()
    assert killed, "no actor was killed: the pass ended before its first answer was seen"
    for s in SETTINGS:
        assert reports[s.name].generated == world.n_good, s.name
        assert answer_texts(files[s]) == alone[s.name], s.name
    final = {a["question_id"]: a["answer_id"] for a in read_lines(files[SETTINGS[0]])}
    assert kept and {q: final[q] for q in kept} == kept
