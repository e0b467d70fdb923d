"""The Ray head that the end-to-end job tests share (one per test package: ``ray job submit`` and sweep drivers)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent


class Head(NamedTuple):
    dashboard: str  # http://127.0.0.1:<port>: the job server (ray job submit --address)
    gcs: str  # 127.0.0.1:<port>: what a driver joins (RAY_ADDRESS)
    env: dict[str, str]  # the environment the Ray CLI and drivers run with
    tmp: Path


@pytest.fixture(scope="package")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A local Ray head of 2 CPUs (token authentication as Ray sets it up), dashboard and job server on 127.0.0.1.

    Teardown runs ``ray stop --force``, which stops every Ray cluster on the machine: run this suite where no
    other Ray cluster is needed (as CI does)."""
    tmp = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this environment's
    env["RAY_AUTH_MODE"] = "token"
    dashboard, gcs = free_port(), free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={tmp / 'ray'}",
    ]
    subprocess.run(start, check=True, env=env, cwd=tmp, capture_output=True, timeout=180)
    yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, tmp)
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
