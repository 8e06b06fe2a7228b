"""Tiered trust and participation counters in the running asynchronous server (FedBuff).

NEEDS THE GLUE: ``AsyncEngine`` calling :class:`broker_server.async_observers.AsyncObservers` and
``ServerStore.count_participation`` (see the async-observers report). The pure hooks are tested
in ``test_async_observers.py``.

Five scripted devices answer every TASK at once (in-memory transport, a real SQLite store): four
honest ones push along one direction, ``evil`` (fewer examples) along the opposite one, so every
buffer's mean points the honest way and evil's cosine to the previous buffer's mean is negative.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.robust import Reputation, TrustConfig
from broker_server.safeguards import TRUST_SETTING
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.messages import TaskMessage
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.async_devices import ScriptedDevice, wait_for

#: cosine flags here (too few devices for the distance test); no release before the run ends
TRUST = {"quarantine_after": 2, "min_round_size": 100, "probation_rounds": 50}
VERSIONS = 8


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteServerStore]:
    opened = SqliteServerStore.open(tmp_path / "server.db")
    yield opened
    opened.close()


class DirectedDevice(ScriptedDevice):
    """``sign × 0.1 × D + 0.01 noise`` with one direction ``D`` for everyone (evil: sign -1)."""

    def delta(self, task: TaskMessage) -> dict[str, np.ndarray]:
        sign = -1.0 if self.device_id == "evil" else 1.0
        common = np.random.default_rng(3)
        noise = np.random.default_rng([zlib.crc32(self.device_id.encode()), task.round])
        return {
            s.name: (sign * 0.1 * common.standard_normal(s.shape) + 0.01 * noise.standard_normal(s.shape)).astype(
                np.float32
            )
            for s in self.bundle.manifest.aggregated_tensors
        }


def test_async_buffers_update_the_reputation_and_quarantine_the_attacker(
    bundle: Bundle, store: SqliteServerStore
) -> None:
    broker = InMemoryBroker()
    honest = [DirectedDevice(broker, f"h-{i}", bundle, num_examples=20, auto=True) for i in range(4)]
    evil = DirectedDevice(broker, "evil", bundle, num_examples=5, auto=True)
    devices = [d.start() for d in [*honest, evil]]
    config = ServerConfig(
        mode="async",
        asynchronous={"buffer_size": 4, "concurrency": 5, "versions": VERSIONS},
        trust=TRUST,
        codecs=("fp32",),
        min_clients=5,
        wait_for_clients_s=10,
        round_timeout_s=30,
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, store=store)
    server.start()
    try:
        results = server.run()
    finally:
        server.close()
        for device in devices:
            device.stop()
    assert [r.completed for r in results] == [True] * VERSIONS
    events = [(e.device_id, e.action, e.round) for e in server.trust_events]
    assert {d for d, _, _ in events} == {"evil"}, events
    quarantined_at = [r for d, action, r in events if action == "quarantine"]
    assert len(quarantined_at) == 1, events
    # quarantined devices get no TASK from the next buffer on
    assert max(t.round for t in evil.tasks) <= quarantined_at[0]
    stored = Reputation.from_state(store.get_setting(TRUST_SETTING), TrustConfig(**TRUST))
    assert stored.quarantined == ("evil",)
    assert all(stored.status(d.device_id).score > TrustConfig().initial_score for d in honest)


def test_async_tasks_count_in_the_store_s_participation_counters(bundle: Bundle, store: SqliteServerStore) -> None:
    broker = InMemoryBroker()
    devices = [DirectedDevice(broker, f"h-{i}", bundle, num_examples=10 + i, auto=True).start() for i in range(3)]
    config = ServerConfig(
        mode="async",
        asynchronous={"buffer_size": 2, "concurrency": 3, "versions": 4},
        codecs=("fp32",),
        min_clients=3,
        wait_for_clients_s=10,
        round_timeout_s=30,
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, store=store)
    server.start()
    try:
        results = server.run()
    finally:
        server.close()
    try:
        assert [r.completed for r in results] == [True] * 4
        contributions: dict[str, int] = {}
        for version in store.model_versions()[1:]:
            stored = store.get_model_version(version, weights=False)
            assert stored is not None
            for c in stored.metrics["contributors"]:
                contributions[c["device_id"]] = contributions.get(c["device_id"], 0) + 1
        for device in devices:  # every TASK sent is counted (its delivery is asynchronous: wait for it)
            wait_for(lambda d=device: store.get_device(d.device_id).selected == len(d.tasks))  # type: ignore[union-attr]
            row = store.get_device(device.device_id)
            assert row is not None and (row.accepted, row.failed) == (contributions[device.device_id], 0)
        assert sum(contributions.values()) == 4 * 2
    finally:
        for device in devices:
            device.stop()
