"""Ray Train + DeepSpeed on local CPU workers, observed through ``LVPRUNING_SAMPLE_LOG``: a run killed mid-epoch and
resumed from its checkpoint trains on the same records, step by step, as one that was never interrupted (the killed
attempt's redone step included, across an epoch boundary, a corrupt image skipped and counted once). A resume at
another worker count: tests/jobs/test_two_node_faults.py (a node lost with elastic workers, and back)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import ray

from pipelines.config import load_config
from pipelines.toy.model import build_toy_model, save_toy_model, toy_processor
from pipelines.toy.writer import write_toy_world
from pipelines.train.data import prepare_instruct_rows
from pipelines.train.driver import fit
from pipelines.train.worker import FAIL_AT_STEP_ENV, SAMPLE_LOG_ENV

MICRO, GLOBAL = 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    world = write_toy_world(root / "world", seed=1, n_train=80, n_test=4)
    records = json.loads(Path(world.train_json).read_text())
    corrupt = 5
    (Path(world.image_folder) / records[corrupt]["image"]).write_bytes(b"\x89PNG\r\n not an image")
    model_path = save_toy_model(root / "init", build_toy_model(), toy_processor())
    ray.init(num_cpus=2, include_dashboard=False)
    processor = toy_processor()
    data, ledger = prepare_instruct_rows(
        str(world.train_json), str(world.image_folder), processor, num_cpus=0.5, max_bad_fraction=0.2
    )
    yield root, data, ledger, corrupt, str(model_path), processor.tokenizer.pad_token_id
    ray.shutdown()


def train(setup, name: str, steps: int, workers: int, env: dict[str, str]) -> ray.train.Result:
    root, data, _, _, model_path, pad_token_id = setup
    cfg = load_config(
        None,
        [
            f"train.global_batch_size={GLOBAL}",
            f"train.micro_batch_size={MICRO}",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "scaling.num_workers=[1,2]",
            f"run.name={name}",
            f"run.storage_path={root / 'runs'}",
            "run.max_failures=1",
        ],
    )
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": workers})})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return fit(cfg, data, model_path, pad_token_id, steps, uri, None, worker_env=env)


def sample_log(directory: Path) -> list[dict]:
    return [
        json.loads(line) for file in sorted(directory.glob("rank*.jsonl")) for line in file.read_text().splitlines()
    ]


def by_step(lines: list[dict]) -> dict[int, list[int]]:
    """Each step's record indices over all ranks, in rank order; a step logged twice (redone) must agree."""
    steps: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for line in lines:
        seen = steps[line["step"]].setdefault(line["rank"], line["ids"])
        assert seen == line["ids"], f"step {line['step']} rank {line['rank']} redone on other records"
    return {step: [i for rank in sorted(ranks) for i in ranks[rank]] for step, ranks in sorted(steps.items())}


@pytest.mark.timeout(1200)
def test_an_interrupted_run_trains_on_the_same_records_as_an_uninterrupted_one(setup):
    root, data, ledger, corrupt, *_ = setup
    steps = 8
    logs = {name: root / f"samples-{name}" for name in ("whole", "killed")}
    whole = train(setup, "whole", steps, 2, {SAMPLE_LOG_ENV: str(logs["whole"])})
    killed = train(setup, "killed", steps, 2, {SAMPLE_LOG_ENV: str(logs["killed"]), FAIL_AT_STEP_ENV: "3"})
    assert whole.error is None and killed.error is None

    whole_lines, killed_lines = sample_log(logs["whole"]), sample_log(logs["killed"])
    # The killed attempt logged steps 1-3 on both ranks, its resume (from the step-2 checkpoint) redid step 3.
    assert sorted((line["step"], line["rank"]) for line in killed_lines) == sorted(
        [(s, r) for s in range(1, steps + 1) for r in (0, 1)] + [(3, 0), (3, 1)]
    )
    assert by_step(killed_lines) == by_step(whole_lines)
    assert all(len(line["ids"]) == GLOBAL // 2 for line in whole_lines)
    epochs = defaultdict(list)
    for line in whole_lines:
        epochs[line["epoch"]] += line["ids"]
    assert set(epochs) == {0, 1}, "the run should cross an epoch boundary"
    for ids in epochs.values():
        assert len(ids) == len(set(ids)) and corrupt not in ids and set(ids) <= set(data.indices)
    assert sorted(epochs[0]) != epochs[0] and epochs[0][: len(epochs[1])] != epochs[1]  # shuffled, anew each epoch
    assert ledger.stats().counts["corrupt_image"] == 1
