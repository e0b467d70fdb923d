"""``ray job submit`` from the tests, as a user types it: submit, wait, read the logs, find the driver's log file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.jobs.conftest import Head

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY_JOB = [str(BIN / "ray"), "job"]


def _ray(head: Head, *argv: str) -> str:
    done = subprocess.run([*RAY_JOB, *argv], env=head.env, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def submit(head: Head, *args: str, script: str = "jobs/train.py", env_vars: dict[str, str] | None = None) -> str:
    """``ray job submit --no-wait -- python <script> *args`` with the project as ``working_dir``; its job id."""
    job_id = f"{Path(script).stem.lstrip('-') or 'python'}-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{head.tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
        | (env_vars or {}),
        # anchored: an unanchored "toy/" would also drop pipelines/toy/ (the shipped toy base model)
        "excludes": ["/outputs/", "/runs/", "/toy/", "/eval/", "/mlruns/", "/mlflow.db", "/.venv/", "/test-artifacts/"],
    }
    command = [f"--address={head.dashboard}", f"--submission-id={job_id}", "--no-wait", f"--working-dir={REPO}"]
    command += [f"--runtime-env-json={json.dumps(runtime_env)}", "--", "python", script, *args]
    for _ in range(30):  # the job agent may come up a little after the dashboard
        out = _ray(head, "submit", *command)
        if "No available agent to submit job" not in out:
            break
        time.sleep(5)
    if f"'{job_id}'" not in out:
        raise RuntimeError(f"ray job submit failed:\n{out[-3000:]}")
    return job_id


def wait(head: Head, job_id: str, timeout: float = 600) -> str:
    """The job's final state (SUCCEEDED, FAILED, STOPPED), polling ``ray job status``: following the log stream
    can stop while the job still runs, as seen once on a 2-core box under load."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = re.search(
            rf"Job '{job_id}' (succeeded|failed|stopped)", _ray(head, "status", f"--address={head.dashboard}", job_id)
        )
        if ended:
            return ended.group(1).upper()
        time.sleep(3)
    return f"not ended after {timeout} s"


def logs(head: Head, job_id: str) -> str:
    return _ray(head, "logs", f"--address={head.dashboard}", job_id)


def run(head: Head, *args: str, timeout: float = 600, script: str = "jobs/train.py", **kwargs) -> tuple[str, str]:
    """Submit, wait for the end: the final state and the logs."""
    job_id = submit(head, *args, script=script, **kwargs)
    return wait(head, job_id, timeout), logs(head, job_id)


def driver_log(head: Head, job_id: str) -> Path:
    """The driver's log file on the head (what ``ray job logs`` serves), read directly for fast polling."""
    return head.ray_root / "head" / "session_latest" / "logs" / f"job-driver-{job_id}.log"


def wait_for_line(head: Head, job_id: str, pattern: str, timeout: float = 600) -> re.Match:
    """Block until the driver's log has a line matching ``pattern``; the match."""
    path, deadline = driver_log(head, job_id), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            found = re.search(pattern, path.read_text(errors="replace"), re.M)
            if found:
                return found
        time.sleep(0.25)
    raise TimeoutError(f"no line matching {pattern!r} in {path} after {timeout} s")
