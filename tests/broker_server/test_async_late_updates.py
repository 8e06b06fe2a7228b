"""Sync rounds with late_updates="async": a straggler's update joins the next round, weighted by staleness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.async_devices import ScriptedDevice


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def delta(device: ScriptedDevice, round_: int, name: str) -> np.ndarray:
    task = next(t for t in device.tasks if t.round == round_)
    return device.delta(task)[name].astype(np.float64)


@pytest.mark.parametrize("policy", ["async", "drop"])
def test_a_stragglers_update_joins_the_next_round_with_staleness_weight(bundle: Bundle, policy: str) -> None:
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
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config)
    server.start()
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
        np.testing.assert_allclose(server.weights[spec.name], v1[spec.name] + mean, rtol=1e-5, atol=1e-6)


def test_late_updates_async_refuses_a_buffered_robust_rule() -> None:
    from edge_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="late_updates: 'async' cannot use robust rule"):
        ServerConfig(late_updates="async", robust={"rule": "median"})
