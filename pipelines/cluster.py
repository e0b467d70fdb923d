"""Joining Ray from a job: the one place that decides between a submitted job's cluster and a local one, how
Ray Data reports progress in a job's log, and what a failed run says about the nodes it lost."""

from __future__ import annotations

import os

import ray
import ray.data


def connect_ray() -> None:
    """Join the cluster of ``ray job submit`` (``RAY_ADDRESS``), else start a local one; no-op when connected.

    Ray Data then shows one progress bar per dataset (no per-operator bars), and Ray's tqdm is off: in a job log
    (no terminal), progress is one line per dataset every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (10),
    where each operator's bar of each actor would otherwise print several lines a second."""
    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False
    context.use_ray_tqdm = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


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
