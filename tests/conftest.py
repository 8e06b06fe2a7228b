"""Shared fixtures: real brokers for integration tests.

Both brokers are session-scoped (starting them per test would dominate the run time), so tests
must isolate themselves with unique client ids and topic prefixes. A missing Mosquitto is a
test failure, never a skip: CI must not go green without having exercised a real broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from broker_server.embedded_broker import EmbeddedBroker
from broker_server.mosquitto_process import MosquittoNotInstalled, MosquittoProcess, free_port

__all__ = ["free_port"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: talks to a real broker (Mosquitto or amqtt)")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A real Mosquitto on a free loopback port (``.host``, ``.port``, ``.url``)."""
    broker = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"))
    try:
        broker.start()
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The in-process amqtt broker on a free loopback port (``.host``, ``.port``, ``.url``)."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-compatible server (``moto_server`` subprocess, tests/edge_agent/blobs/moto_server.py)."""
    from tests.edge_agent.blobs.moto_server import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("moto"), auth=False)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


# The digits bundle, exported once per session (tests/fixtures.py).
from tests.fixtures import digits_bundle, mlp_bundle  # noqa: E402,F401
