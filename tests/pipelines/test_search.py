"""The sweep's search space: every suggestion Optuna can make is a valid LVPruning config inside the space (checked
against the space's definition on many random draws), shifted schedules by hand, and each trial's job config."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest

from lvpruning import PruningConfig
from pipelines.config import load_config
from pipelines.job import resolve
from pipelines.sweep.space import DefineByRun, baseline_trials, check_space, shifted_schedules, trial_job

optuna.logging.set_verbosity(optuna.logging.WARNING)


def suggestions(overrides: list[str], n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """``n`` (Optuna params, returned values) of the space, drawn by a random sampler, each told a random value."""
    cfg = load_config(None, overrides)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    out = []
    for i in range(n):
        trial = study.ask()
        returned = DefineByRun(cfg.sweep.space)(trial)
        study.tell(trial, [i % 7, i % 3])
        out.append((trial.params, returned))
    return out


def on_grid(x: float, step: float) -> bool:
    return abs(x / step - round(x / step)) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_paper_family_suggestions_are_valid_configs_in_the_space(seed):
    cfg = load_config(None, [])
    space = cfg.sweep.space
    seen_layers = set()
    for params, returned in suggestions([], 150, seed):
        layers, ratios = tuple(returned["layers"]), tuple(returned["train_ratios"])
        assert layers in space.layers and params["layers"] == ",".join(map(str, layers))
        seen_layers.add(layers)
        rho = params["rho"]
        assert on_grid(rho, space.ratio_step) and space.rho[0] - 1e-9 <= rho <= space.rho[1] + 1e-9
        expected = tuple(round(rho - 0.2 * s, 6) for s in range(len(layers)))  # [rho, rho - 0.2, rho - 0.4]
        assert ratios == pytest.approx(expected) and ratios[-1] >= space.ratio_step - 1e-9
        assert params["num_blocks"] in space.num_blocks and params["num_heads"] in space.num_heads
        PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, num_heads=params["num_heads"])
    assert seen_layers == set(space.layers)  # every candidate is reachable


def test_free_ratios_are_sorted_non_increasing_on_the_grid_within_the_range():
    overrides = ["sweep.space.ratios=free", "sweep.space.free_range=[0.1,0.8]", "sweep.space.ratio_step=0.1"]
    overrides.append("sweep.space.learning_rate=[1e-4,1e-2]")
    for params, returned in suggestions(overrides, 100):
        ratios, n = returned["train_ratios"], len(returned["layers"])
        drawn = sorted((params[f"ratio{i}"] for i in range(n)), reverse=True)
        assert ratios == pytest.approx(drawn) and all(a >= b for a, b in itertools.pairwise(ratios))
        assert all(0.1 - 1e-9 <= r <= 0.8 + 1e-9 and on_grid(r, 0.1) for r in ratios)
        assert 1e-4 <= params["learning_rate"] <= 1e-2


def test_module_widths_are_searched_when_the_space_has_them_and_reach_the_trial():
    overrides = ["sweep.space.decision_dim=[8,32,null]", "sweep.space.num_heads=[2,4]"]
    widths = {params["decision_dim"] for params, _ in suggestions(overrides, 60)}
    assert widths == {8, 32, None}
    assert all("decision_dim" not in params for params, _ in suggestions([], 5))  # not searched: pruning's
    base = load_config(None, ["run.name=sw"])
    params = {"method": "lvpruning", "layers": [0, 2], "train_ratios": [0.6, 0.4], "num_blocks": 1}
    params |= {"num_heads": 2, "ffn_dim": None}
    assert trial_job(resolve(base), params, "a").config.pruning.decision_dim == base.pruning.decision_dim == 16
    assert trial_job(resolve(base), params | {"decision_dim": None}, "b").config.pruning.decision_dim is None


def test_the_tower_stage_moves_a_trials_first_module_to_minus_one_when_the_space_allows_it():
    """An extension of the paper: with ``sweep.space.tower_stage`` each trial draws whether its first module sits
    at the vision-tower stage; every draw is a valid config, and both kinds of every candidate are reached."""
    space = load_config(None, ["sweep.space.tower_stage=true"]).sweep.space
    seen = set()
    for params, returned in suggestions(["sweep.space.tower_stage=true"], 200):
        candidate = tuple(int(x) for x in params["layers"].split(","))
        layers, ratios = tuple(returned["layers"]), tuple(returned["train_ratios"])
        assert candidate in space.layers and len(ratios) == len(layers)
        assert layers == ((-1, *candidate[1:]) if params["tower_stage"] else candidate)
        PruningConfig(layers=layers, train_ratios=ratios, infer_ratios=ratios, num_heads=params["num_heads"])
        seen.add(layers)
    moved = {(-1, *layers[1:]) for layers in space.layers}  # (-1,), (-1, 1), (-1, 2), (-1, 1, 2)
    assert seen == set(space.layers) | moved
    assert all("tower_stage" not in params for params, _ in suggestions([], 20))  # off: never drawn
    check_space(load_config(None, ["sweep.space.tower_stage=true"]), num_layers=4, hidden_size=128)
    base = load_config(None, ["run.name=sw"])
    params = {"method": "lvpruning", "layers": [-1, 2], "train_ratios": [0.5, 0.3], "num_blocks": 1}
    params |= {"num_heads": 2, "ffn_dim": None, "tower_stage": True}
    assert trial_job(resolve(base), params, "t").config.pruning.layers == (-1, 2)
    with pytest.raises(ValueError, match="sweep.space.tower_stage"):  # -1 is not a candidate's own layer
        load_config(None, ["sweep.space.layers=[[-1,1]]"])


def test_shifted_schedules_by_hand():
    assert shifted_schedules([0.5, 0.3, 0.1], (0.2, -0.2), 0.05) == [(0.5, 0.3, 0.1), (0.7, 0.5, 0.3), (0.3, 0.1, 0.05)]
    assert shifted_schedules([0.9], (0.2, -0.2), 0.05) == [(0.9,), (1.0,), (0.7,)]
    assert shifted_schedules([0.05], (-0.2, -0.3), 0.05) == [(0.05,)]  # clipped to the grid's floor, no repeats


def test_a_trial_config_trains_its_own_setting_and_evaluates_its_schedules():
    base = load_config(None, ["eval.output_dir=/answers", "run.name=sw"])
    params = {"method": "lvpruning", "layers": [0, 2], "train_ratios": [0.6, 0.4], "num_blocks": 1}
    params |= {"num_heads": 2, "ffn_dim": None, "learning_rate": 3e-4}
    cfg = trial_job(resolve(base), params, "abc123").config
    assert cfg.pruning.layers == (0, 2) and cfg.pruning.train_ratios == cfg.pruning.infer_ratios == (0.6, 0.4)
    assert (cfg.pruning.num_blocks, cfg.pruning.num_heads, cfg.train.learning_rate) == (1, 2, 3e-4)
    assert cfg.run.name == "sw-abc123" and cfg.eval.output_dir == "/answers/sw-abc123"
    assert cfg.eval.methods == ("lvpruning",) and cfg.eval.schedules == ((0.6, 0.4), (0.8, 0.6), (0.4, 0.2))

    fastv = trial_job(resolve(base), baseline_trials(base)[2], "def456").config
    assert fastv.eval.methods == ("fastv",) and fastv.pruning == base.pruning
    assert fastv.eval.schedules == base.sweep.baselines.schedules and fastv.eval.output_dir == "/answers/sw-def456"
    assert [t["method"] for t in baseline_trials(base)] == [
        "none",
        "random",
        "fastv",
        "transprune",
        "adaptinfer",
    ]


@pytest.mark.parametrize(
    "override, key",
    [
        ("sweep.space.layers=[[0,3]]", "sweep.space.layers[0]"),  # the toy model has 4 layers: at most 2
        ("sweep.space.num_heads=[2,3]", "sweep.space.num_heads"),  # 3 does not divide 16 (pruning.decision_dim)
        ("sweep.space.decision_dim=[8,256]", "sweep.space.decision_dim"),  # wider than the hidden size 128
        ("sweep.baselines.schedules=[[0.5,0.3]]", "sweep.baselines.schedules[0]"),  # pruning.layers has 3 stages
    ],
)
def test_a_space_that_does_not_fit_the_model_fails_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        check_space(load_config(None, [override]), num_layers=4, hidden_size=128)


def test_check_sweep_makes_local_paths_absolute_for_the_trials_and_keeps_the_toy_model(tmp_path, monkeypatch):
    """Tune runs each trial in a folder of its own: relative paths would point elsewhere there. A ``./toy`` folder
    (the toy world's data) once made ``model.name_or_path=toy`` a path, and the trials lost the toy world."""
    from pipelines.sweep.tuner import check_sweep

    deepspeed = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed" / "zero2_cpu.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "toy").mkdir()
    overrides = [f"scaling.deepspeed_config={deepspeed}", "eval.modules=mods", "data.train_json=d/train.json"]
    overrides += ["eval.data={pope: {questions: q.jsonl, image_root: s3://b/img, annotations: ann}}"]
    cfg = check_sweep(load_config(None, overrides)).config
    assert cfg.model.name_or_path == "toy" and cfg.eval.toy_world == str(tmp_path / "toy" / "world")
    assert cfg.data.toy_root == str(tmp_path / "toy") and cfg.run.output_dir == str(tmp_path / "outputs")
    assert cfg.eval.output_dir == str(tmp_path / "eval" / "lvpruning-toy") and cfg.run.storage_path == str(
        tmp_path / "runs"
    )
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.scaling.deepspeed_config == str(deepspeed)
    assert cfg.data.train_json == str(tmp_path / "d" / "train.json") and cfg.eval.modules == str(tmp_path / "mods")
    pope = cfg.eval.data["pope"]
    assert (pope.questions, pope.image_root, pope.annotations) == (
        str(tmp_path / "q.jsonl"),
        "s3://b/img",
        str(tmp_path / "ann"),
    )

    with pytest.raises(ValueError, match="mlflow.tracking_uri"):  # a cluster's trials cannot reach this file
        check_sweep(load_config(None, [f"scaling.deepspeed_config={deepspeed}", "run.storage_path=s3://b/runs"]))
    with pytest.raises(ValueError, match="train.stage"):
        check_sweep(load_config(None, [f"scaling.deepspeed_config={deepspeed}", "train.stage=base"]))
    with pytest.raises(ValueError, match="sweep.grace_steps"):
        check_sweep(load_config(None, [f"scaling.deepspeed_config={deepspeed}", "train.max_steps=20"]))


def test_the_guard_stops_nothing_before_its_minimum_of_trials_then_the_worst_at_its_rung():
    """By hand: rung at step 20, reduction factor 2 (stop below the median of those recorded), 2 trials first."""
    from types import SimpleNamespace

    from pipelines.sweep.objectives import GuardedASHA

    guard = GuardedASHA("ratio_loss", rung=20, reduction_factor=2, min_trials=2)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(5)]
    for t in trials:
        guard.on_trial_add(None, t)

    def at(trial, step: int, loss: float) -> str:
        return guard.on_trial_result(None, trial, {"step": step, "ratio_loss": loss})

    assert at(trials[0], 10, 9.0) == at(trials[0], 20, 0.1) == "CONTINUE"
    assert at(trials[1], 20, 0.5) == "CONTINUE"  # worse than t0, but only the second trial at the rung
    assert at(trials[2], 20, 0.9) == "STOP"  # the third: worse than the median of 0.1 and 0.5
    assert at(trials[3], 20, 0.05) == "CONTINUE"
    assert at(trials[0], 30, 5.0) == "CONTINUE"  # past the one rung: trains to the end
    assert at(trials[4], 10, 0.9) == "CONTINUE"  # before the rung


def test_baselines_come_first_and_never_reach_optuna_and_a_stopped_trial_is_pruned():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.sweep.objectives import AccuracySearch, BaselinesFirst

    cfg, metrics = load_config(None, ["sweep.baselines.methods=[none,fastv,random]"]), AccuracySearch.metrics
    storage = optuna.storages.InMemoryStorage()  # the study read back through Optuna's own API below
    optuna_search = OptunaSearch(
        space=DefineByRun(cfg.sweep.space),
        metric=list(metrics),
        mode=["max", "min"],
        study_name="baselines-first",
        storage=storage,
    )
    searcher = BaselinesFirst(baseline_trials(cfg), optuna_search, metrics)
    suggested = [searcher.suggest(f"t{i}") for i in range(5)]
    assert [s["method"] for s in suggested] == ["none", "fastv", "random", "lvpruning", "lvpruning"]
    state = searcher.get_state()  # what Tune saves beside the wrapped searcher, and restores on resume
    again = BaselinesFirst([], optuna_search, metrics)
    again.set_state(state)
    assert again.baselines == [] and again.baseline_ids == {"t0", "t1", "t2"}

    searcher.on_trial_complete("t1", {"accuracy/mean": 50.0, "tflops": 1.0})  # a baseline: not Optuna's trial
    searcher.on_trial_complete("t3", {"step": 20, "ratio_loss": 0.5})  # stopped while training
    searcher.on_trial_complete("t4", {"accuracy/mean": 90.0, "tflops": 2.0})
    study = optuna.load_study(study_name="baselines-first", storage=storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert len(trials) == 2  # only the searched trials are Optuna's
    assert trials[0].state.name == "PRUNED" and trials[1].state.name == "COMPLETE"
    assert trials[1].values == [90.0, 2.0]


def test_trial_run_status_ends_the_runs_that_tune_ended_while_they_ran(tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from pipelines.sweep.tuner import TrialRunStatus
    from pipelines.tracking import TRIAL_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    stopped = client.create_run(experiment, tags={TRIAL_TAG: "a"}).info.run_id
    setting = client.create_run(experiment, tags={"mlflow.parentRunId": stopped}).info.run_id
    aborted = client.create_run(experiment, tags={TRIAL_TAG: "a"}).info.run_id  # its Train run aborted: FAILED
    client.set_terminated(aborted, "FAILED")
    failed = client.create_run(experiment, tags={TRIAL_TAG: "b"}).info.run_id
    done = client.create_run(experiment, tags={TRIAL_TAG: "c"}).info.run_id
    client.set_terminated(done, "FINISHED")
    callback = TrialRunStatus(uri, "sweep")
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="a"))
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="b"))
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="c"))
    status = {run_id: client.get_run(run_id).info.status for run_id in (stopped, setting, aborted, failed, done)}
    assert status == {stopped: "KILLED", setting: "KILLED", aborted: "KILLED", failed: "FAILED", done: "FINISHED"}


def test_a_resumed_sweep_ends_the_runs_of_trials_it_does_not_know(tmp_path):
    """Tune saves its state every 10 s or so: a trial started after the last save is not restored, and its runs
    would stay RUNNING for good."""
    from mlflow import MlflowClient

    from pipelines.sweep.tuner import end_orphans
    from pipelines.tracking import PARENT_TAG, TRIAL_TAG

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep")
    sweep = client.create_run(experiment).info.run_id

    def trial(trial_id: str) -> str:
        return client.create_run(experiment, tags={PARENT_TAG: sweep, TRIAL_TAG: trial_id}).info.run_id

    known, lost, done = trial("known"), trial("lost"), trial("done")
    setting = client.create_run(experiment, tags={PARENT_TAG: lost}).info.run_id
    client.set_terminated(done, "FINISHED")
    end_orphans(client, "sweep", sweep, {"known"})
    status = {run_id: client.get_run(run_id).info.status for run_id in (known, lost, setting, done, sweep)}
    assert status == {known: "RUNNING", lost: "KILLED", setting: "KILLED", done: "FINISHED", sweep: "RUNNING"}
