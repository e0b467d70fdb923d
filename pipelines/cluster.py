"""Joining Ray from a job: the one place that decides between a submitted job's cluster and a local one."""

from __future__ import annotations

import os

import ray


def connect_ray() -> None:
    """Join the cluster of ``ray job submit`` (``RAY_ADDRESS``), else start a local one; no-op when connected."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
