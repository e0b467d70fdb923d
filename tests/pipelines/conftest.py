"""Fixtures of the inference, evaluation and latency tests: a tiny world written once per module, local Ray."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from tests.pipelines.test_inference import TinyWorld, write_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A 2-CPU local Ray for the module, unless one is already up."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()
