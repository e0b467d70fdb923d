"""Fixtures shared across the suite: real services on loopback, started by the tests."""

from __future__ import annotations

import logging
import socket
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
