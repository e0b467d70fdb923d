"""MLflow conventions shared by the jobs: where the tracking store is, and runs that always end with a status."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:  # annotations only: the frontier job reads MLflow without the config schema
    from pipelines.config import JobConfig

RUN_NAME_TAG = "lvpruning.run_name"
KIND_TAG = "lvpruning.kind"  # what a run is, where it is not an evaluated setting: sweep, trial, frontier
TRIAL_TAG = "lvpruning.trial_id"  # the Ray Tune trial a sweep's run belongs to
PARENT_TAG = "mlflow.parentRunId"  # nests a run under another in the UI


def redact(value: Any) -> Any:
    """``value`` with the ``user:password@`` part of every URL removed (configs are logged; secrets are not)."""
    if isinstance(value, str):
        return re.sub(r"(\w+://)[^/@\s]+@", r"\1", value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, created if it does not exist."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow filter: single-quoted, double-quoted when it holds a single quote
    (the filter syntax has no escapes; a value with both quotes cannot be searched for)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: an MLflow filter value cannot hold both ' and \"")


def runs_with_tags(
    client: MlflowClient,
    experiment_ids: Sequence[str],
    tags: Mapping[str, str],
    *,
    run_name: str | None = None,
    status: str | None = None,
    **search: Any,
) -> list[Run]:
    """The runs of ``experiment_ids`` carrying every tag of ``tags`` (and named ``run_name``, with ``status``, where
    given). ``search``: the other arguments of ``MlflowClient.search_runs`` (``order_by``, ``max_results``)."""
    clauses = [f"tags.`{key}` = {filter_literal(str(value))}" for key, value in tags.items()]
    clauses += [f"attributes.run_name = {filter_literal(run_name)}"] if run_name is not None else []
    clauses += [f"attributes.status = {filter_literal(status)}"] if status is not None else []
    return client.search_runs(list(experiment_ids), filter_string=" and ".join(clauses), **search)


def tracking_uri(cfg: JobConfig) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db`` here (made
    absolute, so Ray workers on other processes write to the same store)."""
    return resolve_uri(cfg.mlflow.tracking_uri)


def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a relative SQLite path made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def tracking_path(uri: str) -> str | None:
    """The local file or folder a resolved tracking URI writes to (``sqlite:///``, ``file:``, a plain path); None
    for a server (``http(s)://``, a database server)."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite://")
    if uri.startswith("file:"):
        return uri.removeprefix("file:").removeprefix("//")
    return None if "://" in uri else uri


UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default (loopback)
MODEL_TRAINING = "workflowType=machine_learning"  # MLflow 3's runs view; without it a link opens its GenAI view


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to open the UI on this store (bound to loopback; pass --host to share it deliberately), and links to the
    experiment's runs and to ``run_id``'s page, in MLflow's model-training view."""
    uri = redact(uri)
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI
    lines = [] if server != UI else [f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"]
    lines.append(f"runs: {server}/#/experiments/{experiment_id}?{MODEL_TRAINING}")
    if run_id is not None:
        lines.append(f"run: {server}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}")
    return "\n  ".join(lines)


def experiment_link(cfg: JobConfig) -> str:
    """Where the config's experiment is and how to open its runs in the UI (:func:`ui_hint`)."""
    uri = tracking_uri(cfg)
    experiment = MlflowClient(uri).get_experiment_by_name(cfg.mlflow.experiment)
    where = f"MLflow: experiment '{cfg.mlflow.experiment}' at {redact(uri)}"
    return where if experiment is None else f"{where}\n  {ui_hint(uri, experiment.experiment_id)}"


def latest_training_run(cfg: JobConfig, uri: str) -> Run | None:
    """The newest training run of this run name and stage, if any."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    tags, newest = {RUN_NAME_TAG: cfg.run.name, "stage": cfg.train.stage}, ["attributes.start_time DESC"]
    runs = runs_with_tags(client, [experiment.experiment_id], tags, order_by=newest, max_results=1)
    return runs[0] if runs else None


def resumable_run_id(cfg: JobConfig, uri: str) -> str | None:
    """The unfinished training run of this run name, if a previous attempt left one (resume logs into it)."""
    run = latest_training_run(cfg, uri)
    return run.info.run_id if run is not None and run.info.status != "FINISHED" else None


@contextmanager
def mlflow_run(
    cfg: JobConfig, run_name: str, tags: dict[str, str], params: dict[str, Any], run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start (or continue) a run, log the resolved config and ``params``; end FINISHED, or FAILED on an error."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags) as run:
        if run_id is None:
            mlflow.log_params(redact({f"config.{k}": v for k, v in cfg.flat().items()} | params))
            mlflow.log_dict(redact(cfg.model_dump(mode="json")), "config.json")
        yield run


class CheckpointedHistory:
    """A training run's per-step metrics, sent to MLflow at checkpoints only, so that a resumed run's history holds
    each step once: the steps a failed attempt did after its last checkpoint were never sent, and are sent when the
    resumed attempt redoes them. Steps already in the history (an attempt killed between sending and checkpointing)
    are not sent again."""

    KEY = "loss"  # logged at every logged step: the last step of its history is the last step sent

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(uri), run_id
        self.sent_up_to = max((m.step for m in self.client.get_metric_history(run_id, self.KEY)), default=0)
        self.pending: list[Metric] = []

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        if step > self.sent_up_to:
            now = int(time.time() * 1000)
            self.pending += [Metric(name, value, now, step) for name, value in metrics.items()]

    def send(self) -> None:
        """Send what was added since the last call (MLflow takes up to 1000 metrics per batch)."""
        for start in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        if self.pending:
            self.sent_up_to = max(m.step for m in self.pending)
        self.pending = []


def trial_run(client: MlflowClient, cfg: JobConfig, tags: dict[str, str], params: dict[str, Any]) -> str:
    """The MLflow run of an evaluation-only trial: found again by its trial id when the trial is resumed."""
    experiment = get_or_create_experiment(client, cfg.mlflow.experiment)
    found = runs_with_tags(client, [experiment], {TRIAL_TAG: tags[TRIAL_TAG]})
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"{cfg.run.name}-{params['method']}", tags=tags)
    values = {"method": params["method"], "layers": json.dumps(params["layers"])}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in values.items()])
    return run.info.run_id
