"""Sync rounds with late_updates="async": a straggler's update joins the next round, weighted by
staleness, with its BatchNorm statistics rebased onto the model the round applies to."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.manifest import ROLE_PARAMETER
from edge_agent.protocol.messages import TaskMessage
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.async_devices import ScriptedDevice


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteServerStore]:
    opened = SqliteServerStore.open(tmp_path / "server.db")
    yield opened
    opened.close()


def delta(device: ScriptedDevice, round_: int, name: str) -> np.ndarray:
    task = next(t for t in device.tasks if t.round == round_)
    return device.delta(task)[name].astype(np.float64)


@pytest.mark.parametrize("policy", ["async", "drop"])
def test_a_stragglers_update_joins_the_next_round_with_staleness_weight(
    bundle: Bundle, policy: str, store: SqliteServerStore
) -> None:
    broker = InMemoryBroker()
    fast = [ScriptedDevice(broker, f"fast-{i}", bundle, num_examples=10 + 5 * i, auto=True) for i in range(2)]
    slow = ScriptedDevice(broker, "slow", bundle, num_examples=40)
    devices = [d.start() for d in [*fast, slow]]
    config = ServerConfig(
        rounds=2,
        clients_per_round=2,
        over_selection=1.5,  # 3 tasks for 2 wanted: the round does not wait for the slow device
        min_clients=3,
        wait_for_clients_s=10,
        round_timeout_s=30,
        codecs=("fp32",),
        late_updates=policy,
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, store=store)
    server.start()
    v0 = {k: v.astype(np.float64) for k, v in server.weights.items()}
    try:
        first = server.run_round(1)
        assert first.completed and first.reported == 2
        v1 = {k: v.astype(np.float64) for k, v in server.weights.items()}
        late = slow.wait_tasks(1)[0]
        slow.answer(late)  # after round 1 closed: trained on v0, the model is at v1 (staleness 1)
        slow.answer(late, attempt=2)  # a QoS-1 re-send: never counted twice
        expected_events = 2  # the update and its copy: kept + refused, or dropped twice
        for _ in range(100):
            server.serve(0.05)
            if server.late_folded + server.late_updates + len(server.rejections) >= expected_events:
                break
        second = server.run_round(2)  # the slow device holds its round-2 task: fast devices complete it
        assert second.completed and second.reported == 2
    finally:
        for device in devices:
            device.stop()
        server.close()
    weights = [(d, 2, float(d.num_examples)) for d in fast]
    if policy == "async":
        weights.append((slow, 1, 40 / math.sqrt(2)))
        assert (server.late_folded, server.late_updates) == (1, 0)
        assert [r.code for r in server.rejections] == ["contract_violation"]
        assert "duplicate" in server.rejections[0].reason
    else:
        assert (server.late_folded, server.late_updates) == (0, 2)
    total = sum(w for _, _, w in weights)
    for spec in bundle.manifest.aggregated_tensors:
        mean = sum(w * delta(d, r, spec.name) for d, r, w in weights) / total
        expected = v1[spec.name] + mean
        if policy == "async" and spec.role != ROLE_PARAMETER:  # BatchNorm statistics: the slow device's own are v0 + Δ
            expected += (40 / math.sqrt(2)) / total * (v0[spec.name] - v1[spec.name])
        np.testing.assert_allclose(server.weights[spec.name], expected, rtol=1e-5, atol=1e-6)


def test_late_updates_async_refuses_a_buffered_robust_rule() -> None:
    from edge_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="late_updates: 'async' cannot use robust rule"):
        ServerConfig(late_updates="async", robust={"rule": "median"})


#: hand-picked updates per (device, round): (running_var Δ, running_mean Δ, Δ of every parameter)
HAND_DELTAS = {
    ("fast-0", 1): (-0.9, 0.2, 0.1),
    ("fast-1", 1): (-0.9, 0.2, 0.1),
    ("slow", 1): (-0.95, -0.4, -0.3),  # trained on v0: its own running_var is 1 - 0.95 = 0.05
    ("fast-0", 2): (0.0, 0.0, 0.05),
    ("fast-1", 2): (0.0, 0.0, 0.05),
}


class HandDevice(ScriptedDevice):
    """Sends :data:`HAND_DELTAS`: the same value in every element of a tensor."""

    def delta(self, task: TaskMessage) -> dict[str, np.ndarray]:
        var, mean, parameter = HAND_DELTAS[(self.device_id, task.round)]
        by_name = {"1.running_var": var, "1.running_mean": mean}
        return {
            s.name: np.full(s.shape, by_name.get(s.name, parameter), np.float32)
            for s in self.bundle.manifest.aggregated_tensors
        }


def straggler_federation(bundle: Bundle, store: SqliteServerStore | None) -> FederatedServer:
    """Round 1 completes with fast-0/1 (10 examples each) while ``slow`` (40) still trains on v0;
    its update arrives after round 1 closed (staleness 1, weight 40/√2) and joins round 2."""
    broker = InMemoryBroker()
    fast = [HandDevice(broker, f"fast-{i}", bundle, num_examples=10, auto=True) for i in range(2)]
    slow = HandDevice(broker, "slow", bundle, num_examples=40)
    devices = [d.start() for d in [*fast, slow]]
    config = ServerConfig(
        rounds=2,
        clients_per_round=2,
        over_selection=1.5,
        min_clients=3,
        wait_for_clients_s=10,
        round_timeout_s=30,
        codecs=("fp32",),
        late_updates="async",
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, store=store)
    server.start()
    try:
        assert server.run_round(1).completed
        slow.answer(slow.wait_tasks(1)[0])
        for _ in range(100):
            server.serve(0.05)
            if server.late_folded:
                break
        assert server.late_folded == 1
        assert server.run_round(2).completed
    finally:
        for device in devices:
            device.stop()
        server.close()
    return server


def test_a_late_update_s_batchnorm_statistics_are_rebased_not_added(bundle: Bundle, store: SqliteServerStore) -> None:
    initial = bundle.initial_weights()
    assert np.all(initial["1.running_var"] == 1.0) and np.all(initial["1.running_mean"] == 0.0)
    server = straggler_federation(bundle, store)
    # v1 = v0 + fast mean: running_var 0.1, running_mean 0.2. Round 2 averages the fast devices'
    # own statistics (0.1 and 0.2, weight 10 each) with the slow device's own (v0 + Δ: 0.05 and
    # -0.4, weight 40/√2):  var = (20·0.1 + 20√2·0.05) / (20 + 20√2) = √2/20 = 0.070711
    #                       mean = (20·0.2 − 20√2·0.4) / (20 + 20√2) = −0.151472
    # Added to v1 as a plain delta instead, var would be 0.1 − 0.95·√2/(1+√2) = −0.456497 < 0.
    np.testing.assert_allclose(server.weights["1.running_var"], np.full(8, 0.070711), atol=2e-6)
    np.testing.assert_allclose(server.weights["1.running_mean"], np.full(8, -0.151472), atol=2e-6)
    # parameters are deltas of the optimiser, never rebased: v0 + 0.1 + (20·0.05 − 20√2·0.3) / (20 + 20√2)
    for name in ("0.weight", "3.bias"):
        np.testing.assert_allclose(server.weights[name], initial[name] + 0.1 - 0.155025, atol=2e-6)
