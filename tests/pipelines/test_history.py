"""``CheckpointedHistory``: a resumed run's MLflow history holds each step once, whatever the kill point."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipelines.tracking import CheckpointedHistory


def attempt(uri: str, run_id: str, start: int, stop: int, checkpoint_every: int) -> None:
    """One training attempt from step ``start`` + 1: adds every step, sends at each checkpoint, dies after ``stop``
    (what it added after its last checkpoint is never sent)."""
    history = CheckpointedHistory(uri, run_id)
    for step in range(start + 1, stop + 1):
        history.add(step, {"loss": 1.0 / step, "lr": 0.1})
        if step % checkpoint_every == 0:
            history.send()


@pytest.mark.parametrize("killed_after", [12, 19, 20])
def test_each_step_is_logged_once_after_resumes(tmp_path, killed_after):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("h")).info.run_id
    attempt(uri, run_id, 0, killed_after, 10)  # killed: the steps after its last checkpoint were never sent
    resume_from = killed_after // 10 * 10
    if killed_after == 20:  # sent at step 20, killed before the checkpoint was saved: the resume starts at 10
        resume_from = 10
    attempt(uri, run_id, resume_from, 30, 10)
    for key in ("loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, 31)), (key, steps)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert all(losses[s] == pytest.approx(1.0 / s) for s in losses)


def test_more_than_one_batch_of_metrics_is_sent_whole(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("h")).info.run_id
    history = CheckpointedHistory(uri, run_id)
    for step in range(1, 301):
        history.add(step, {f"m{i}": float(i) for i in range(4)} | {"loss": 0.5})
    history.send()  # 1500 metrics: two batches
    assert len(client.get_metric_history(run_id, "m3")) == 300 and history.sent_up_to == 300
