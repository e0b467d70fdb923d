"""Joining Ray from a job: the one place that decides between a submitted job's cluster and a local one, how
Ray Data reports progress in a job's log, what a failed run says about the nodes it lost, and how a path on this
node's disk reaches the other nodes (they share no filesystem on ``cluster/a100.yaml``): :func:`for_every_node`."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.job import Job
from pipelines.storage import is_complete, is_s3, join, upload_folder
from pipelines.tracking import tracking_path


def connect_ray(job: Job) -> None:
    """Join the cluster of ``ray job submit`` (``RAY_ADDRESS``), else start a local one (no-op when connected), and
    check that no node would need a path only this node has (:func:`check_paths`: ``ValueError`` naming the key,
    before any work is given to the cluster).

    Ray Data then shows one progress bar per dataset (no per-operator bars), and Ray's tqdm is off: in a job log
    (no terminal), progress is one line per dataset every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (10),
    where each operator's bar of each actor would otherwise print several lines a second."""
    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False
    context.use_ray_tqdm = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    check_paths(job)


def lost_nodes(since_ms: int) -> list[str]:
    """The nodes of this cluster that died at or after ``since_ms`` (Unix time), each as ``<ip> (node <id>):
    <reason>``; empty where Ray's state API (the dashboard) does not answer."""
    from ray.util.state import list_nodes

    try:
        dead = list_nodes(filters=[("state", "=", "DEAD")], detail=True, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 (a failure report must not fail on the way)
        return []
    return [
        f"{node.node_ip} (node {node.node_id[:12]}): {node.state_message or 'no reason recorded'}"
        for node in dead
        if (node.end_time_ms or 0) >= since_ms
    ]


@ray.remote(num_cpus=0)
def _fingerprint_remote(path: str) -> str | None:
    return fingerprint(path)


def fingerprint(path: str) -> str | None:
    """What a node sees at ``path``: a folder's sorted names (the first 1000), a file's size; None where nothing."""
    p = Path(path)
    if p.is_dir():
        return json.dumps(sorted(os.listdir(p))[:1000])
    return str(p.stat().st_size) if p.is_file() else None


def nodes_not_seeing(path: str) -> list[str]:
    """The other live nodes of the cluster (each ``<ip> (node <id>)``) that do not see what this process sees at
    the local ``path`` (a folder every node mounts, e.g. NFS, passes; each node's own disk does not). A writable
    folder gets a marker file of a unique name for the time of the check, so an empty or look-alike folder on
    another node does not pass for it. Empty on one node, and before Ray is initialized."""
    if not ray.is_initialized():  # no cluster joined: Ray Data starts a local one
        return []
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return []
    marker = Path(path) / f".lvpruning-visible-{uuid.uuid4().hex}"
    try:
        marker.touch()
    except OSError:
        marker = None  # read-only or not a folder: compared by what is there
    try:
        expected = fingerprint(path)
        seen = ray.get(
            [
                _fingerprint_remote.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(path)
                for node in others
            ]
        )
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    return [
        f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})"
        for node, theirs in zip(others, seen, strict=True)
        if theirs != expected
    ]


def check_seen(path: str | None, key: str, way_on: str) -> list[str]:
    """``nodes_not_seeing`` a local ``path`` (none for None or ``s3://``), as a ``ValueError`` naming ``key``, the
    nodes and ``way_on`` (what to do instead) when ``way_on`` is given; else the list, for the caller to decide."""
    blind = [] if path is None or is_s3(path) else nodes_not_seeing(path)
    if blind and way_on:
        raise ValueError(f"{key}: {path} is on this node's disk only, and {', '.join(blind)} cannot see it; {way_on}")
    return blind


_SHARED: dict[tuple[str, str, str | None], str] = {}


def for_every_node(path: str | None, key: str, storage_path: str | None) -> str | None:
    """``path`` (a local folder a remote node must read: a model, decision modules, images) as every node of the
    cluster reads it: itself when it is ``s3://``, a hub id, or seen by every live node; else its copy under
    ``<storage_path>/.lvpruning/shared/<digest>/<name>`` (uploaded once: the digest covers the files' names, sizes
    and times) when ``storage_path`` is ``s3://``; else ``ValueError`` naming ``key`` and the nodes that do not
    see it. Readers turn the result into a local path with ``pipelines.storage.local_copy``."""
    if path is None or is_s3(path) or not Path(path).is_dir():
        return path
    cache_key = (path, fingerprint(path) or "", storage_path)
    if cache_key in _SHARED:
        return _SHARED[cache_key]
    copy = storage_path is not None and is_s3(storage_path)
    way_on = "" if copy else "put it on s3:// or a filesystem every node mounts, or set run.storage_path=s3://..."
    shared = path
    if check_seen(path, key, way_on):
        folder = Path(path)
        found = (p for p in folder.rglob("*") if p.is_file())
        files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in found)
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        shared = join(storage_path, f".lvpruning/shared/{digest}/{folder.name}")
        if not is_complete(shared):
            size = sum(f[1] for f in files) / 2**20
            print(f"{key}: copying {path} ({len(files)} files, {size:.1f} MiB) to {shared}: other nodes read it there")
            upload_folder(folder, shared)
    _SHARED[cache_key] = shared
    return shared


def check_paths(job: Job) -> None:
    """Fail before any cluster work, naming the key, where a node of the cluster would read or write a path that
    only this node has: ``run.storage_path`` and a file-based ``mlflow.tracking_uri`` (every node writes there),
    and, unless ``run.storage_path`` is ``s3://`` (then :func:`for_every_node` copies them there), the toy world
    (``data.toy_root``) and the local folders that workers and actors read: the model, ``data.image_root``,
    ``eval.modules`` and the benchmarks' image folders. On one node, nothing to check."""
    cfg = job.config
    written = {"run.storage_path": cfg.run.storage_path, "mlflow.tracking_uri": tracking_path(cfg.mlflow.tracking_uri)}
    if written["mlflow.tracking_uri"] is not None and not Path(written["mlflow.tracking_uri"]).is_dir():
        written["mlflow.tracking_uri"] = str(Path(written["mlflow.tracking_uri"]).parent)  # SQLite's file
    read: dict[str, str | None] = {}
    if not is_s3(cfg.run.storage_path):
        written |= {"data.toy_root": cfg.data.toy_root} if job.is_toy else {}
        read = {"model.name_or_path": None if job.is_toy else cfg.model.name_or_path, "eval.modules": cfg.eval.modules}
        read |= {} if job.is_toy else {"data.image_root": cfg.data.image_root}
        read |= {f"eval.data.{name}.image_root": b.image_root for name, b in cfg.eval.data.items()}
    for key, path in (written | read).items():
        if path is None or is_s3(path) or not (key in written or Path(path).is_dir()):
            continue
        Path(path).mkdir(parents=True, exist_ok=True)
        way_on = "use s3:// (or a filesystem every node mounts)"
        check_seen(path, key, way_on + ("" if key in written else ", or run.storage_path=s3://..."))
