"""Every YAML under jobs/configs validates, and the 7B config holds the paper's settings (section 4.1); every job
reads its command line before the heavy stack and fails on a bad one or a bad config with one ``error:`` line, exit
code 2, before any cluster work."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lvpruning import paper_schedule
from lvpruning.config import check_schedule
from lvpruning.flops import analytic_flops, image_layout, num_vision_tokens
from lvpruning.policies import POLICIES
from lvpruning.presets import load_llava_config
from pipelines.config import load_config
from pipelines.conversation import processor_kwargs
from pipelines.eval.evaluation import PAPER_TEXT_TOKENS, make_settings
from pipelines.job import resolve
from pipelines.sweep.space import check_space
from pipelines.sweep.tuner import check_sweep
from pipelines.toy.model import toy_config
from pipelines.train.experiment import check_training
from tests.bad_bytes import SEEDS, not_utf8, not_utf8_problem

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
CONFIGS = sorted((JOBS / "configs").glob("*.yaml"))
HEAVY = ("deepspeed", "mlflow", "ray", "torch", "transformers")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    load_config(path)


def test_llava15_7b_config_has_the_papers_settings():
    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "llava15_7b.yaml")
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert cfg.pruning.layers == (1, 8, 16)
    assert cfg.pruning.train_ratios == paper_schedule(0.5) == (0.5, 0.3, 0.1)
    assert (cfg.pruning.num_blocks, cfg.pruning.num_heads, cfg.pruning.decision_dim) == (2, 8, None)  # full width
    t = cfg.train
    assert (t.learning_rate, t.warmup_ratio, t.lr_schedule, t.global_batch_size) == (2e-6, 0.03, "cosine", 64)
    assert (t.weight_decay, t.max_grad_norm, t.epochs, t.stage) == (0.0, 1.0, 1, "pruning")
    assert t.adam_betas == (0.9, 0.999)  # LLaVA's Trainer defaults
    assert cfg.scaling.use_gpu and cfg.scaling.deepspeed_config.endswith("zero2_bf16.json")


def test_pruning_defaults_follow_the_model():
    """The toy world's slim modules for the toy model, a section filling in from them; the paper's full-width ones
    for any other model, however little its pruning section says."""
    toy = load_config().pruning
    assert (toy.layers, toy.decision_dim, toy.num_blocks, toy.num_heads) == ((0, 1, 2), 16, 1, 2)
    partial = load_config(None, ["pruning.lambda_ratio=1.0", "pruning.gumbel_tau=0.5"]).pruning
    assert (partial.decision_dim, partial.num_blocks, partial.lambda_ratio, partial.gumbel_tau) == (16, 1, 1.0, 0.5)
    other = load_config(None, ["model.name_or_path=llava-hf/llava-1.5-7b-hf", "pruning.lambda_ratio=1.0"]).pruning
    assert (other.decision_dim, other.num_blocks, other.num_heads, other.lambda_ratio) == (None, 2, 8, 1.0)
    slim = load_config(None, ["model.name_or_path=llava-hf/llava-1.5-7b-hf", "pruning.decision_dim=512"]).pruning
    assert slim.decision_dim == 512


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rat=1e-3", "train.learning_rat"),
        ("train.micro_batch_size=3", "global_batch_size"),
        ("pruning.train_ratios=[0.5,0.6,0.1]", "train_ratios"),
        ("eval.methods=[none,topk]", "eval.methods"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("train.adam_betas=[0.9,1.0]", "train.adam_betas"),
        ("train.adam_betas=[0.9]", "train.adam_betas"),
        ("data.shuffle_buffer=256", "data.shuffle_buffer"),  # gone: the order is a permutation per epoch
        ("scaling.num_workers=[2,1]", "scaling.num_workers"),
        ("scaling.num_workers=[1,3]", "train.global_batch_size"),  # 32 is no multiple of 16 x 3 workers
        ("data.toy_question_types=[color,colour]", "question_types"),
        ("model.processor.max_pixels=1000", "min_pixels and max_pixels go together"),
        ("model.processor={min_pixels: 2000, max_pixels: 1000}", "min_pixels 2000 is above max_pixels 1000"),
        ("train.init_from=toy/base_model", "train.init_from"),  # stage pruning: nothing to go on training
        ("sweep.space.layers=[[1,0]]", "sweep.space.layers"),  # not strictly increasing
        ("sweep.space.layers=[[0,1,2,3,4]]", "sweep.space.layers"),  # 1 to 4 stages
        ("sweep.space.layers=[]", "sweep.space.layers"),
        ("sweep.space.rho=[0.1,0.4]", "sweep.space.rho"),  # no rho leaves the third stage a ratio >= 0.05
        ("sweep.space.rho=[0.8,0.6]", "sweep.space.rho"),
        ("sweep.space.free_range=[0,0.5]", "sweep.space.free_range"),
        ("sweep.space.num_blocks=[]", "sweep.space.num_blocks"),
        ("sweep.space.learning_rate=[1e-3,1e-4]", "sweep.space.learning_rate"),
        ("sweep.baselines.methods=[lvpruning]", "sweep.baselines.methods"),  # trained, not a baseline
        ("sweep.num_trials=0", "sweep.num_trials"),
        ("sweep.concurency=2", "sweep.concurency"),
        ("sweep.space.rho=[0.32,0.34]", "sweep.space.rho"),  # no multiple of ratio_step 0.05 inside
        ("sweep.space.free_range=[0.06,0.09]", "sweep.space.free_range"),
        ("sweep.guard_metric=ratio-loss", "sweep.guard_metric"),
        ("sweep.baselines.schedules=[]", "sweep.baselines.schedules"),
        ("scaling.resources_per_worker={GPU: 1}", "set by cpus_per_worker and use_gpu"),
        ("scaling.resources_per_worker={accelerator_a100: 0}", "must be positive"),
        ("scaling.placement_strategy=spread", "scaling.placement_strategy"),
        ("run.max_start_failures=-2", "run.max_start_failures"),
    ],
)
def test_impossible_overrides_fail_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("name", ["sweep_toy.yaml", "sweep_toy_width.yaml", "calibrate_toy.yaml"])
def test_toy_sweep_configs_fit_the_toy_model(name, monkeypatch):
    """As ``jobs/sweep.py`` checks them before any cluster work: the base config and every candidate of the space
    against the toy model's shape (``toy_config()``: its decoder layers and hidden size)."""
    monkeypatch.chdir(ROOT)  # where the jobs run: scaling.deepspeed_config is relative to it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = check_sweep(load_config(ROOT / "jobs" / "configs" / name)).config
    assert cfg.model.name_or_path == "toy"
    text = toy_config().text_config
    assert all(layers[-1] < text.num_hidden_layers - 1 for layers in cfg.sweep.space.layers)


def test_llava_next_7b_config_fits_its_model_with_the_papers_schedule():
    cfg = load_config(JOBS / "configs" / "llava_next_7b.yaml")
    assert cfg.model.name_or_path == "llava-hf/llava-v1.6-vicuna-7b-hf"
    shape = load_llava_config("llava-next-7b")  # the shape of that checkpoint, offline
    cfg.pruning.check_model(shape.text_config.num_hidden_layers, shape.text_config.hidden_size)
    assert cfg.pruning.layers == (1, 8, 16) and cfg.pruning.train_ratios == paper_schedule(0.5)
    assert cfg.data.max_length > image_layout(shape).num_vision_tokens == 2928  # a 672 x 672 image fits
    assert cfg.gradient_accumulation_steps(8) == 2 and cfg.run.name != load_config(CONFIGS[0]).run.name
    assert all(POLICIES[m].published.layers[0] >= 0 for m in cfg.eval.methods if m != "none")  # LLM-side only


def test_region_focus_configs_fit_their_models(monkeypatch):
    """The Region Focus Module's configs: the 7B's four layers within LLaVA-NeXT-7B's 32 (and OneVision-7B's 28),
    the score's layer distilled under the reference's skip; the toy one resolved against the hires toy model."""
    cfg = load_config(JOBS / "configs" / "region_focus_llava_next_7b.yaml")
    assert (cfg.train.stage, cfg.model.name_or_path) == ("region_focus", "llava-hf/llava-v1.6-vicuna-7b-hf")
    rf = cfg.region_focus
    assert rf.layers == (4, 8, 12, 16) and rf.skipped == (1, 2) and len(rf.layers) - 1 not in rf.skipped
    for preset in ("llava-next-7b", "llava-onevision-7b"):
        assert rf.layers[-1] < load_llava_config(preset).text_config.num_hidden_layers
    assert cfg.scaling.use_gpu and cfg.data.max_length > 2928 and not cfg.train.gradient_checkpointing
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = resolve(load_config(JOBS / "configs" / "toy_region_focus.yaml"))
    check_training(job)
    assert job.config.data.toy_variant == "hires" and job.config.region_focus.layers[-1] < job.num_layers == 4
    assert job.config.stage_run_name == f"{job.config.run.name}-region-focus"
    # evaluated: the base model alone, then the pyramid with the module the stage exports
    assert job.config.eval.methods == ("none",) and job.config.eval.lrs_vqa.region_focus is None


@pytest.mark.parametrize(
    "name, model, patch, shape",
    [
        ("qwen2_5_vl_7b.yaml", "Qwen/Qwen2.5-VL-7B-Instruct", 14, load_llava_config("qwen2.5-vl-7b").text_config),
        # Qwen3-VL-8B-Instruct's published text shape (36 layers of width 4096): no engine or preset needed
        ("qwen3_vl_8b.yaml", "Qwen/Qwen3-VL-8B-Instruct", 16, SimpleNamespace(num_hidden_layers=36, hidden_size=4096)),
    ],
)
def test_qwen_vl_configs_fit_their_models_and_bound_the_vision_tokens(name, model, patch, shape):
    """The paper's schedule on the model's decoder; the processor's pixel bounds, through Qwen2-VL's own image
    processor at the model's patch size, give 256 to 1024 vision tokens, which data.max_length holds."""
    cfg = load_config(JOBS / "configs" / name)
    assert cfg.model.name_or_path == model and cfg.run.name.startswith("lvpruning-qwen")
    cfg.pruning.check_model(shape.num_hidden_layers, shape.hidden_size)
    assert cfg.pruning.layers == (1, 8, 16) and cfg.pruning.train_ratios == paper_schedule(0.5)
    assert all(POLICIES[m].published.layers[0] >= 0 for m in cfg.eval.methods if m != "none")  # LLM-side only
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, **processor_kwargs(cfg.model.processor.options()))
    tokens = []
    for height, width in [(32, 32), (224, 448), (4000, 3000), (8000, 500)]:
        grid = images(images=[Image.new("RGB", (width, height))], return_tensors="np")["image_grid_thw"][0]
        tokens.append(int(grid.prod()) // 4)
    assert tokens[0] >= 256 and max(tokens) <= 1024 and tokens[2] > 900  # a large image is cut down to the bound
    assert cfg.data.max_length > max(tokens) + 100


def test_sweep_configs_fit_their_models():
    toy = load_config(CONFIGS[[p.name for p in CONFIGS].index("sweep_toy.yaml")])
    text = toy_config().text_config
    check_space(toy, text.num_hidden_layers, text.hidden_size)
    assert toy.sweep.num_trials >= 8 and len(toy.sweep.space.layers) > 1
    big = load_config(CONFIGS[[p.name for p in CONFIGS].index("sweep_llava15_7b.yaml")])
    text = load_llava_config("llava-1.5-7b").text_config  # the shape of llava-hf/llava-1.5-7b-hf, offline
    check_space(big, text.num_hidden_layers, text.hidden_size)
    assert big.model.name_or_path == "llava-hf/llava-1.5-7b-hf" and (1, 8, 16) in big.sweep.space.layers
    assert big.sweep.space.rho == (0.3, 0.7) and big.sweep.space.ratios == "paper"
    assert big.sweep.space.rho_range(3) == (0.45, 0.7) and big.sweep.space.rho_range(1) == (0.3, 0.7)


def test_sweep_job_checks_the_space_before_any_cluster_work(tmp_path):
    sweep = Path(__file__).resolve().parents[2] / "jobs" / "sweep.py"
    done = subprocess.run(
        [sys.executable, str(sweep), "sweep.space.layers=[[0,1],[1,3]]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=99,
    )
    assert done.returncode == 2, done.stderr
    assert "sweep.space.layers[1]" in done.stderr and "4 decoder layers" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no toy world, no MLflow store, no Ray session written


def test_a_partial_pruning_section_keeps_the_jobs_default_layers():
    cfg = load_config(None, ["pruning.lambda_ratio=20"])
    assert cfg.pruning.lambda_ratio == 20 and cfg.pruning.layers == load_config().pruning.layers == (0, 1, 2)
    two = ["pruning.layers=[1,2]", "pruning.train_ratios=[0.5,0.3]", "pruning.infer_ratios=[0.5,0.3]"]
    assert load_config(None, [*two, "eval.schedules=[[0.5,0.3]]"]).pruning.layers == (1, 2)


def test_each_run_name_answers_into_its_own_folder():
    """The base stage and the main job once shared ./eval, and the second stopped on the first's answers."""
    main, base = load_config(), load_config(CONFIGS[[p.name for p in CONFIGS].index("toy_base.yaml")])
    assert main.answers_dir == "./eval/lvpruning-toy" and base.answers_dir == "./eval/lvpruning-toy-base"
    assert base.stage_run_name == "lvpruning-toy-base"  # its checkpoints' folder under run.storage_path
    assert load_config(None, ["eval.output_dir=/data/answers"]).answers_dir == "/data/answers"


def test_train_job_checks_the_toy_model_shape_before_any_cluster_work(tmp_path):
    train = Path(__file__).resolve().parents[2] / "jobs" / "train.py"
    done = subprocess.run(
        [sys.executable, str(train), "pruning.layers=[1,2,3]"], cwd=tmp_path, capture_output=True, text=True, timeout=99
    )
    assert done.returncode == 2
    assert "PruningConfig.layers" in done.stderr and "4 decoder layers" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no toy world, no MLflow store, no Ray session written


def test_train_job_checks_init_from_before_any_cluster_work(tmp_path):
    train = Path(__file__).resolve().parents[2] / "jobs" / "train.py"
    base = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "toy_base.yaml"
    done = subprocess.run(
        [sys.executable, str(train), "--config", str(base), "train.init_from=missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=99,
    )
    assert done.returncode == 2
    assert "train.init_from" in done.stderr and "not a saved model" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_methods_toy_fits_the_toy_model_at_matched_budgets(monkeypatch):
    """Every setting of the all-methods table (methods x schedules at the decision modules' stages, and each
    ``eval.at_own_layers`` entry at its own layers) fits the toy model: its layers below the last decoder layer, its
    schedules one ratio per stage, counted on the toy model's vision tokens, at the budgets the file states."""
    monkeypatch.chdir(ROOT)
    job = resolve(load_config(ROOT / "jobs" / "configs" / "methods_toy.yaml"))
    check_training(job)
    cfg = job.config
    model = toy_config()
    text, n_vision = model.text_config, num_vision_tokens(model)
    assert (text.num_hidden_layers, n_vision) == (4, 64)  # "averaged over the 4 layers", "all 64 tokens"
    # --modules outputs/lvpruning-toy/pruning: the main job's modules, at the stages the LLM-side methods use
    assert cfg.pruning.layers == load_config().pruning.layers == (0, 1, 2)
    ev = cfg.eval
    for schedule in ev.schedules:  # what jobs/evaluate.py checks before any work
        cfg.pruning.check_ratios(schedule)
    for own in ev.at_own_layers:
        for schedule in own.schedules:
            check_schedule(own.layers, schedule, text.num_hidden_layers)

    budgets: dict[str, list[float]] = {}  # vision tokens per decoder layer, averaged over the layers
    for setting in make_settings(ev.methods, ev.schedules, ev.seed, ev.at_own_layers):
        if setting.method == "none":
            continue
        layers = setting.layers if setting.layers is not None else cfg.pruning.layers
        assert layers[-1] < text.num_hidden_layers - 1, setting  # a stage has a decoder layer after it
        report = analytic_flops(  # checks the layers, the schedule and the method's stages against the model
            model,
            cfg.pruning,
            setting.keep_ratios,
            PAPER_TEXT_TOKENS,
            method=setting.method,
            layers=setting.layers,
            params=dict(setting.params),
        )
        per_layer = [n - PAPER_TEXT_TOKENS for n in report.tokens_per_layer]
        assert len(per_layer) == text.num_hidden_layers and max(per_layer) <= n_vision
        budgets.setdefault(setting.method, []).append(sum(per_layer) / len(per_layer))
    llm_side = [34.75, 30.25, 27.75, 32.0, 26.5, 21.25]  # the schedules' comments
    assert {m: budgets[m] for m in ev.methods if m != "none"} == {m: llm_side for m in ev.methods if m != "none"}
    assert {own.method for own in ev.at_own_layers} == {"visionzip", "vscan", "vflowopt", "star"}
    for own in ev.at_own_layers:  # "32 / 26.5 / 21.25 per layer (to half a token), then 14 and 7"
        assert budgets[own.method] == pytest.approx([32.0, 26.5, 21.25, 14.0, 7.0], abs=0.5), own.method


@pytest.mark.parametrize("job", ["train", "evaluate", "sweep", "frontier"])
def test_help_comes_before_the_heavy_stack(job):
    """``--help`` (and any bad command line) imports none of Ray, torch, DeepSpeed, MLflow: no seconds of imports,
    no warning of theirs before the usage."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(JOBS / job)!r} + '.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=99)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"usage: {job}.py") and done.stdout.endswith("heavy: []\n")


def job_main(job: str) -> Callable[[Sequence[str]], int]:
    """``main`` of ``jobs/<job>.py``, imported as a module (the jobs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{job}", JOBS / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """Runs in ``tmp_path`` with Ray's start made to fail the test."""

    def connect_ray(job) -> None:
        raise AssertionError("a bad command line or config reached the cluster")

    monkeypatch.setattr("pipelines.cluster.connect_ray", connect_ray)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize(
    "job, argv, message",
    [
        ("evaluate", ["--model", "llava-1.5-7b"], "eval.methods has 'lvpruning' but no decision modules"),
        ("evaluate", [], "model.name_or_path=toy: give the trained toy model's directory"),
        ("evaluate", ["--model", "llava-1.5-7b", "--modules", "missing"], "not an LVPruning decision-module"),
        ("evaluate", ["--model", "llava-1.5-7b", "eval.methods=[none]", "eval.benchmarks=[gqa]"], "benchmarks ['gqa']"),
        ("train", ["train.learning_rat=1e-3"], "train.learning_rat"),
        ("sweep", ["sweep.num_trials=0"], "sweep.num_trials"),
        ("train", ["train.learning_rate=[1e-3"], "override 'train.learning_rate=[1e-3':1:6: not valid YAML"),
    ],
)
def test_a_bad_config_is_one_error_line_and_exit_2(no_cluster, capsys, job, argv, message):
    assert job_main(job)(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err
    assert list(Path.cwd().iterdir()) == []  # no toy world, no MLflow store, no answers written


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("job", ["train", "evaluate", "sweep"])
def test_a_config_file_that_is_not_utf8_names_its_line(no_cluster, tmp_path, capsys, job, seed):
    bad = not_utf8(seed)
    config = tmp_path / "job.yaml"
    config.write_bytes(b"run:\n  name: x\n  # " + bad + b"\n")
    assert job_main(job)(["--config", str(config)]) == 2
    assert f"error: {config}:3: {not_utf8_problem(b'  # ' + bad)}\n" in capsys.readouterr().err


def test_a_config_file_that_is_not_yaml_names_its_line(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("run:\n  name: [x\ntrain: {}\n")
    with pytest.raises(ValueError, match=re.escape(f"{config}:3:6: not valid YAML (expected ',' or ']'")):
        load_config(config)


@pytest.mark.parametrize("seed", SEEDS)
def test_decision_modules_whose_config_is_not_utf8_name_its_line(no_cluster, tmp_path, capsys, seed):
    bad = not_utf8(seed)
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "lvpruning_config.json").write_bytes(b'{"pruning_config":\n  "' + bad + b'"}\n')
    assert job_main("evaluate")(["--model", "llava-1.5-7b", "--modules", str(modules)]) == 2
    problem = not_utf8_problem(b'  "' + bad)
    assert f"error: {modules / 'lvpruning_config.json'}:2: {problem}\n" in capsys.readouterr().err


def test_a_deepspeed_config_that_is_not_json_names_its_line(tmp_path):
    from pipelines.train.worker import deepspeed_config

    path = tmp_path / "zero2.json"
    path.write_text('{"zero_optimization": {"stage": 2},\n "bf16": {"enabled": tru}}\n')
    cfg = load_config(None, [f"scaling.deepspeed_config={path}"])
    with pytest.raises(ValueError, match=re.escape(f"scaling.deepspeed_config: {path}:2:22: not valid JSON")):
        deepspeed_config(cfg)
