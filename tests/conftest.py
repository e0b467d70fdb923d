"""Fixtures shared across the suite: real services on loopback, started by the tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator

import pytest


class _DeprecationLogToWarning(logging.Handler):
    """transformers logs some deprecations instead of warning (``logger.warning_once("... deprecated ...")``, e.g.
    reading ``output.past_key_values`` since 5.24): re-issue them as a FutureWarning from their transformers module,
    so that pyproject's ``filterwarnings`` fails the test that caused them."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and "deprecated" in message.lower():
            warnings.warn_explicit(message, FutureWarning, record.pathname, record.lineno, module=record.name)


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("transformers").addHandler(_DeprecationLogToWarning())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tear down while the interpreter is whole: a Ray left up by a test, and the cycles holding autograd graphs
    and saved-tensor hooks (activation checkpointing). Left to interpreter shutdown, their native destructors can
    run after the modules they need are gone: CI once passed every test and then died of SIGSEGV at exit."""
    import gc

    import ray

    if ray.is_initialized():
        ray.shutdown()
    gc.collect()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback, fake credentials in the environment (set before Ray starts workers)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }.items():
            mp.setenv(name, value)
        yield endpoint
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on SQLite with proxied artifacts, on a free loopback port; yields its http URI. One per
    session: tests share it, so each uses experiments of its own names."""
    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    argv += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner (7 huey consumers) on 2 cores
    log = open(root / "server.log", "wb")
    # A process group of its own: uvicorn's worker goes with it at the end.
    server = subprocess.Popen(
        [*argv, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
    )
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited ({server.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 90 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()
