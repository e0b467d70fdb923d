"""The faults a cluster run must survive, on the two-node cluster (``head``: a head and a second ``ray start
--address`` node, each with its own temp dir, the second seeing none of the driver's files), with real processes
killed. Jobs arrive through ``ray job submit``; checkpoints go to ``s3://`` on moto's server, the training images are
read from ``s3://``, and MLflow is the team server (PostgreSQL, artifacts in S3). Each test prints what happened and
how long the recovery took. The workers' sample logs (``LVPRUNING_SAMPLE_LOG``) go to a folder both nodes see."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.toy.base import ToyWorld
from pipelines.train.worker import SAMPLE_LOG_ENV
from tests.jobs import ray_jobs
from tests.jobs.conftest import BUCKET, RAY_AUTH_TOKEN, SECRETS, pg_dump

EXPERIMENT = "faults"
STEPS = 30  # optimizer steps of each training run here, checkpointed every 10
RECORDS = 120  # the toy world's usable training conversations: one epoch is the 30 steps of 4


def sample_log() -> Path:
    """A folder for ``LVPRUNING_SAMPLE_LOG`` that both nodes see (not under the folders the second node has hidden)."""
    return Path(tempfile.mkdtemp(prefix="lvp-samples-"))


def sample_lines(folder: Path) -> list[dict]:
    """Every line of every rank's sample log, in each file's order."""
    return [json.loads(line) for path in sorted(folder.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


def final_ids(folder: Path) -> dict[int, list[int]]:
    """step -> the record indices of the attempt that did it last (rank 0's last line for the step names that
    attempt's worker count W; each rank r < W's last line for the step is that attempt's), ranks in order."""
    last: dict[tuple[int, int], dict] = {}
    for line in sample_lines(folder):
        last[line["step"], line["rank"]] = line
    steps = sorted({step for step, _ in last})
    return {s: [i for r in range(last[s, 0]["world"]) for i in last[s, r]["ids"]] for s in steps}


@pytest.fixture(scope="module")
def toy(head, s3) -> dict[str, str]:
    """The toy world written once (reused by every job), its images copied to ``s3://lvpruning/toy/images``."""
    world = ToyWorld.at(head.tmp / "faults-toy", seed=0).written(n_train=480, n_test=48)
    client, folder = s3.client(), world.paths.image_folder
    for image in folder.rglob("*.png"):
        client.upload_file(str(image), BUCKET, f"toy/images/{image.relative_to(folder)}")
    return {"toy_root": str(world.root), "image_root": f"s3://{BUCKET}/toy/images"}


def train_args(toy: dict[str, str], mlflow_uri: str, name: str, *extra: str) -> list[str]:
    return [
        "--no-eval",
        f"run.name={name}",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"mlflow.experiment={EXPERIMENT}",
        f"data.toy_root={toy['toy_root']}",
        f"data.image_root={toy['image_root']}",
        "data.toy_train_samples=480",  # 120 conversations: 30 steps of 4 in an epoch
        "data.toy_test_samples=48",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=10",
        f"run.storage_path=s3://{BUCKET}/runs",
        "scaling.placement_strategy=SPREAD",  # one worker per node
        *extra,
    ]


def training_run(mlflow_uri: str, name: str):
    """The one training run of ``name`` in the experiment (fails if there are several)."""
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], f"tags.`lvpruning.run_name` = '{name}' and tags.stage = 'pruning'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_history_once(mlflow_uri: str, run) -> None:
    """Every logged step exactly once, 1..STEPS, for each per-step metric."""
    client = MlflowClient(mlflow_uri)
    for key in ("loss", "lr", "ratio_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, STEPS + 1)), (key, sorted(steps))


def step_line(step_regex: str) -> str:
    return rf"step ({step_regex})/{STEPS}\b"


def kill(pattern: str) -> int:
    """SIGKILL the first process whose command line matches ``pattern``; its pid."""
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert pids, f"no process matches {pattern!r}"
    os.kill(int(pids[0]), signal.SIGKILL)
    return int(pids[0])


@pytest.mark.timeout(900)
def test_a_worker_killed_between_checkpoints_resumes_exactly_and_logs_each_step_once(head, mlflow_server, toy):
    samples = sample_log()
    job = ray_jobs.submit(head, *train_args(toy, mlflow_server, "worker-kill"), env_vars={SAMPLE_LOG_ENV: str(samples)})
    killed_at = int(ray_jobs.wait_for_line(head, job, step_line("1[2-7]")).group(1))
    kill("ray::RayTrainWorker")
    t_kill = time.monotonic()
    ray_jobs.wait_for_line(head, job, r"resumed from step 10\b")
    recovered = time.monotonic() - t_kill
    state, logs = ray_jobs.wait(head, job), ray_jobs.logs(head, job)
    print(f"worker SIGKILLed after step {killed_at}: resumed from step 10 in {recovered:.0f} s; job {state}")
    assert state == "SUCCEEDED", logs[-4000:]
    run = training_run(mlflow_server, "worker-kill")
    assert run.info.status == "FINISHED" and run.data.params["total_steps"] == str(STEPS)
    assert_history_once(mlflow_server, run)
    assert "skipped/missing_image" in run.data.metrics and run.data.metrics["skipped/missing_image"] == 0
    # each progress line once: steps up to the checkpoint and those after the redone ones (printed again) once
    printed = [int(n) for n in re.findall(rf"step (\d+)/{STEPS}\b", logs)]
    assert sorted(set(printed)) == list(range(1, STEPS + 1))
    assert [n for n in printed if n <= 10 or n > 20] == [*range(1, 11), *range(21, STEPS + 1)], printed
    # an exact resume: the redone steps (11..killed_at) train on the samples the killed attempt had, in its order,
    # and the epoch (all 30 steps) sees each of the 120 records once
    done: dict[tuple[int, int], list[list[int]]] = {}
    for line in sample_lines(samples):
        done.setdefault((line["step"], line["rank"]), []).append(line["ids"])
    redone = {key: ids for key, ids in done.items() if len(ids) > 1}
    assert {step for step, _ in redone} >= set(range(11, killed_at + 1)), sorted(redone)
    assert all(attempts[0] == attempts[-1] for attempts in redone.values()), redone
    epoch = [i for ids in final_ids(samples).values() for i in ids]
    assert len(epoch) == len(set(epoch)) == RECORDS


@pytest.mark.timeout(900)
def test_a_killed_driver_resumes_in_the_same_mlflow_run_when_resubmitted(head, mlflow_server, toy):
    args = train_args(toy, mlflow_server, "driver-kill")
    job = ray_jobs.submit(head, *args)
    killed_at = int(ray_jobs.wait_for_line(head, job, step_line("1[2-7]")).group(1))
    kill("^python jobs/train.py .*run.name=driver-kill")
    assert ray_jobs.wait(head, job, timeout=120) == "FAILED"
    first = training_run(mlflow_server, "driver-kill")
    assert first.info.status == "RUNNING"  # killed: nobody could end it

    t_resubmit = time.monotonic()
    again = ray_jobs.submit(head, *args)
    ray_jobs.wait_for_line(head, again, r"resumed from step 10\b")
    recovered = time.monotonic() - t_resubmit
    state, logs = ray_jobs.wait(head, again), ray_jobs.logs(head, again)
    print(f"driver SIGKILLed after step {killed_at}: the resubmitted job resumed from step 10 in {recovered:.0f} s")
    assert state == "SUCCEEDED", logs[-4000:]
    assert f"MLflow run {first.info.run_id}" in logs
    run = training_run(mlflow_server, "driver-kill")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert_history_once(mlflow_server, run)


@pytest.mark.timeout(900)
def test_an_inference_actor_killed_mid_evaluation_leaves_every_answer_once(head, mlflow_server, toy, tmp_path):
    questions = 48
    args = [
        "--model=pipelines/toy/base_model",  # the shipped toy base model, in the job's working_dir
        f"eval.toy_world={toy['toy_root']}/world",
        "eval.methods=[none]",
        f"eval.max_questions={questions}",
        "eval.batch_size=2",
        "eval.max_new_tokens=2",
        "eval.num_actors=2",
        "eval.latency_repeats=0",
        f"eval.output_dir={tmp_path}",
        f"mlflow.tracking_uri={mlflow_server}",
        f"mlflow.experiment={EXPERIMENT}",
        f"run.storage_path=s3://{BUCKET}/runs",  # the model reaches the actors on the second node there
    ]
    job = ray_jobs.submit(head, *args, script="jobs/evaluate.py")
    answers = tmp_path / "none" / "toy.jsonl"
    deadline = time.monotonic() + 600
    while not (answers.is_file() and len(answers.read_text().splitlines()) >= 6):
        assert time.monotonic() < deadline, ray_jobs.logs(head, job)[-3000:]
        time.sleep(0.25)
    written = len(answers.read_text().splitlines())
    kill("ray::.*MapWorker")
    state, logs = ray_jobs.wait(head, job), ray_jobs.logs(head, job)
    print(f"inference actor SIGKILLed with {written}/{questions} answers written; job {state}")
    assert state == "SUCCEEDED", logs[-4000:]
    ids = [json.loads(line)["question_id"] for line in answers.read_text().splitlines()]
    assert len(ids) == questions and len(set(ids)) == questions


def checkpoints(s3, name: str) -> dict[str, dict]:
    """The run's checkpoints in S3: folder -> its trainer state (step, epoch, samples)."""
    client, prefix = s3.client(), f"runs/{name}/"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/trainer_state.json"):
                body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                found[item["Key"].rsplit("/", 2)[-2]] = json.loads(body)
    return found


@pytest.mark.timeout(900)
def test_an_s3_outage_during_a_checkpoint_upload_keeps_the_previous_one_and_resumes(head, mlflow_server, toy, s3):
    args = train_args(toy, mlflow_server, "s3-outage")
    job = ray_jobs.submit(head, *args)
    ray_jobs.wait_for_line(head, job, step_line("9"))  # the checkpoint of step 10 is next
    s3.proxy.down()
    time.sleep(8)
    s3.proxy.up()
    t_up = time.monotonic()
    state, logs = ray_jobs.wait(head, job), ray_jobs.logs(head, job)
    resumed = re.findall(r"resumed from step (\d+)", logs)
    print(
        f"S3 away for 8 s at the step-10 checkpoint: job {state} {time.monotonic() - t_up:.0f} s after S3 came back, "
        f"resumed from steps {sorted(set(resumed))}"
    )
    if state != "SUCCEEDED":  # it failed, clearly: the next run resumes from the checkpoint kept
        assert re.search(r"Error|error", logs), logs[-4000:]
        state, logs = ray_jobs.run(head, *args)
        assert state == "SUCCEEDED" and "resumed from step" in logs, logs[-4000:]
    run = training_run(mlflow_server, "s3-outage")
    assert run.info.status == "FINISHED"
    assert_history_once(mlflow_server, run)
    assert {s["step"] for s in checkpoints(s3, "s3-outage").values()} >= {STEPS}


@pytest.mark.timeout(900)
def test_stopping_the_second_node_fails_in_bounded_time_naming_it_and_keeps_the_checkpoint(
    head, mlflow_server, toy, s3
):
    # one worker per node (each node has one `trainer`): the run cannot go on without the second node
    # the worker lost is restarted once (max_failures), its start then waits 20 s twice (max_start_failures)
    extra = ["scaling.resources_per_worker={trainer: 1}", "run.max_failures=1", "run.max_start_failures=1"]
    args = train_args(toy, mlflow_server, "node-stop", *extra)
    job = ray_jobs.submit(head, *args, env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
    ray_jobs.wait_for_line(head, job, step_line("1[2-7]"))
    head.stop_second_node()
    t_stop = time.monotonic()
    try:
        state, logs = ray_jobs.wait(head, job, timeout=420), ray_jobs.logs(head, job)
        took = time.monotonic() - t_stop
        print(f"second node stopped mid-training: job {state} {took:.0f} s later")
        assert state == "FAILED", logs[-4000:]
        assert re.search(r"losing 1 node\(s\): \S+ \(node [0-9a-f]{12}\): Expected termination", logs), logs[-4000:]
        assert f"kept under s3://{BUCKET}/runs/node-stop: re-run with run.name=node-stop" in logs, logs[-4000:]
        assert {s["step"] for s in checkpoints(s3, "node-stop").values()} == {10}
    finally:
        head.start_second_node()
    state, logs = ray_jobs.run(head, *args)  # the node is back: the same run goes on from its checkpoint
    assert state == "SUCCEEDED" and "resumed from step 10" in logs, logs[-4000:]
    assert_history_once(mlflow_server, training_run(mlflow_server, "node-stop"))


@pytest.mark.timeout(900)
def test_a_node_lost_with_elastic_workers_goes_on_at_one_and_grows_back_to_two(head, mlflow_server, toy):
    """``scaling.num_workers=[1,2]``, one worker per node, a checkpoint every 5 steps: the second node stopped
    mid-run, the run goes on at one worker from the last checkpoint; once that worker has written a checkpoint of
    its own, the node is back and the run grows to two workers from it; every step logged once, every record of the
    epoch trained on once across both changes."""
    samples = sample_log()
    extra = ["scaling.num_workers=[1,2]", "scaling.resources_per_worker={trainer: 1}", "scaling.resize_check_s=5"]
    extra += ["train.checkpoint_every=5"]
    # the restart first waits for two workers' resources (Ray's view lags the loss): 20 s, not 60, before one
    env = {SAMPLE_LOG_ENV: str(samples), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    job = ray_jobs.submit(head, *train_args(toy, mlflow_server, "elastic", *extra), env_vars=env)
    ray_jobs.wait_for_line(head, job, step_line("1[2-4]"))
    head.stop_second_node()
    t_stop = time.monotonic()
    try:
        shrunk = r"resumed from step (\d+) \(epoch 0\) at 1 workers \(checkpoint written by 2\)"
        at = int(ray_jobs.wait_for_line(head, job, shrunk).group(1))
        t_shrunk = time.monotonic() - t_stop
        own = (at // 5 + 1) * 5  # the first checkpoint the one worker writes
        ray_jobs.wait_for_line(head, job, rf"{shrunk}[\s\S]*step {own + 1}/{STEPS}\b")
    finally:
        head.start_second_node()
    t_back = time.monotonic()
    grown = r"resumed from step (\d+) \(epoch 0\) at 2 workers \(checkpoint written by 1\)"
    regrown_at = int(ray_jobs.wait_for_line(head, job, grown).group(1))
    t_grown = time.monotonic() - t_back
    state, logs = ray_jobs.wait(head, job), ray_jobs.logs(head, job)
    print(
        f"second node stopped with elastic workers: on at 1 worker from step {at} {t_shrunk:.0f} s later; node back: "
        f"at 2 workers from step {regrown_at} {t_grown:.0f} s later; job {state}"
    )
    assert state == "SUCCEEDED", logs[-4000:]
    run = training_run(mlflow_server, "elastic")
    assert run.info.status == "FINISHED"
    assert_history_once(mlflow_server, run)
    worlds = {line["world"] for line in sample_lines(samples)}
    assert worlds == {1, 2}
    ids = final_ids(samples)
    assert sorted(ids) == list(range(1, STEPS + 1)) and all(len(step) == 4 for step in ids.values())
    epoch = [i for step in ids.values() for i in step]
    assert len(epoch) == len(set(epoch)) == RECORDS  # none lost, none twice


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.timeout(900)
def test_secrets_in_the_environment_leak_nowhere(head, mlflow_server, postgres, s3, toy, tmp_path):
    """A training + evaluation job with the fake secrets in its environment; then the MLflow store (a dump of the
    whole database), every object in the bucket (artifacts, checkpoints) and every log of both nodes and of the
    jobs (this module's and the other tests' of this package, all on the same cluster) are scanned for them."""
    digests = {name: hashlib.sha256(value.encode()).hexdigest() for name, value in SECRETS.items()}
    check = (
        "import hashlib, json, os, sys; expected = json.loads(sys.argv[1]); sys.exit(any(hashlib.sha256("
        "os.environ.get(k, '').encode()).hexdigest() != v for k, v in expected.items()))"
    )
    state, _ = ray_jobs.run(head, check, json.dumps(digests), script="-c")
    assert state == "SUCCEEDED"  # the job environment does hold every secret

    args = train_args(toy, mlflow_server, "secrets")[1:]  # with evaluation
    args += ["train.max_steps=4", "eval.max_questions=4", "eval.batch_size=4", "eval.max_new_tokens=2"]
    args += ["eval.latency_batch_size=4", "eval.latency_warmup=1", "eval.latency_repeats=2"]
    args += [f"eval.output_dir={tmp_path / 'eval'}", f"run.output_dir={tmp_path / 'outputs'}"]
    state, logs = ray_jobs.run(head, *args)
    assert state == "SUCCEEDED", logs[-4000:]

    places = {"mlflow database": pg_dump(postgres), "job logs": logs}
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            places[f"s3://{BUCKET}/{item['Key']}"] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    for path in files_under(*head.temp_dirs, head.tmp, tmp_path):
        try:
            places[str(path)] = path.read_bytes()
        except FileNotFoundError:  # a live node's scratch file replaced meanwhile (Ray's tmp_prom_metrics_...json)
            continue
    assert len(places) > 100
    leaks = [
        f"{name} in {where}"
        for where, content in places.items()
        for name, value in (SECRETS | {"RAY_AUTH_TOKEN": RAY_AUTH_TOKEN}).items()
        if (value.encode() if isinstance(content, bytes) else value) in content
    ]
    # Ray Tune's own doing, not ours (ray/tune/execution/class_cache.py): it copies AWS_ACCESS_KEY_ID and
    # AWS_SECRET_ACCESS_KEY from the sweep driver's environment into each trial actor's runtime_env, which each
    # node's runtime_env_agent.log records. docs/cluster.md says so: on a cluster, S3 access through the instance
    # role, no keys in the environment.
    by_tune = [
        leak
        for leak in leaks
        if leak.split(" in ")[0] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        and leak.endswith("/logs/runtime_env_agent.log")
    ]
    if by_tune:
        print(f"Ray Tune's runtime_env records the AWS keys: {len(by_tune)} times in runtime_env_agent.log")
    assert [leak for leak in leaks if leak not in by_tune] == [], "\n".join(leaks)
