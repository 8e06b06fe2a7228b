"""FedBuff with secure aggregation over a real Mosquitto: 10 real agents (threads) train the digits bundle.

``mode = "async"``, ``buffer_size = 10``: every buffer is one session over all 10 devices (t = 7).
Buffer 1: 3 devices (30 %) drop at the masking step (their masked inputs never leave): the buffer
seals from the 7 survivors and v1 equals the example-weighted FedAvg of their plaintext updates
within ``weighted_bound``. Buffer 2: 4 devices never advertise keys: 6 < t, the session aborts, no
unmasking request goes out and the model stays v1. Its devices are re-tasked: buffer 3 (all 10)
seals v2 from v1.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from broker_server.server import FederatedServer, RoundResult, ServerConfig
from edge_agent.agent import Agent
from edge_agent.agent_config import AgentConfig
from edge_agent.codecs import decode_update
from edge_agent.protocol.messages import SecAggMessage, UpdateMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.secagg import ring_spec_for
from edge_agent.secagg.weighting import weighted_bound
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.mqtt import MqttTransport
from tests.fixtures import digits_split
from tests.integration.test_secagg_mosquitto import RecordingTransport, mqtt, spy_updates

PREFIX = Topics("secagg-async-it/v1")
ADVERTISE, MASKED, UNMASK_REQUEST = 2, 6, 7
SECAGG = {"clip": 4.0, "quant_bits": 16, "keys_timeout_s": 3, "shares_timeout_s": 10, "unmask_timeout_s": 10}


class DroppingTransport:
    """A real MQTT connection that swallows this device's SECAGG messages of the kinds ``drop`` names
    per buffer (a dropout at that step, as the server sees it); everything else goes through."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        #: buffer (round) -> FFSA type swallowed in it
        self.drop: dict[int, int] = {}

    def start(self) -> None:
        self.inner.start()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s=None) -> None:
        if payload.startswith(b"FFLK") and payload[5] == 9:
            message = decode_message(payload)
            if isinstance(message, SecAggMessage) and self.drop.get(message.round) == message.kind:
                return
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        return self.inner.receive(timeout=timeout)

    def close(self) -> None:
        self.inner.close()


def fedavg(updates: dict[tuple[int, str], UpdateMessage], round_: int, names: list[str], specs) -> dict:
    shapes = {t.name: tuple(t.shape) for t in specs}
    deltas = {n: decode_update(updates[round_, n].payload, shapes) for n in names}
    counts = {n: updates[round_, n].num_examples for n in names}
    total = sum(counts.values())
    return {s.name: sum(counts[n] * deltas[n][s.name].astype(np.float64) for n in names) / total for s in specs}, total


@pytest.mark.timeout(120)
def test_fedbuff_buffers_are_secure_sessions_over_mosquitto(mosquitto, digits_bundle) -> None:
    devices, _ = digits_split(10, alpha=5.0, seed=3)
    names = [f"sab-{i}" for i in range(10)]
    links = {name: DroppingTransport(mqtt(mosquitto.url, name)) for name in names}
    for name in names[7:]:
        links[name].drop[1] = MASKED  # buffer 1: 30 % drop at masking
    for name in names[6:]:
        links[name].drop[2] = ADVERTISE  # buffer 2: 4 never advertise keys -> abort
    updates: dict[tuple[int, str], UpdateMessage] = {}
    stop = threading.Event()
    agents = []
    for i, name in enumerate(names):
        agent = Agent(
            AgentConfig(device_id=name, topics=PREFIX, seed=i),
            links[name],  # type: ignore[arg-type]
            OrtTrainer.open(digits_bundle, threads=1),
            devices[i],
        )
        spy_updates(agent, updates)
        agents.append(agent)
    for agent in agents:
        agent.start()
    threads = [threading.Thread(target=a.run, args=(stop,), kwargs={"poll_s": 0.05}) for a in agents]
    for thread in threads:
        thread.start()
    server_side = RecordingTransport(mqtt(mosquitto.url, "secagg-async-server"))
    config = ServerConfig(
        mode="async",
        asynchronous={"buffer_size": 10, "concurrency": 10, "versions": 2, "task_timeout_s": 10},
        min_clients=10,
        wait_for_clients_s=30,
        local_epochs=1,
        topics=PREFIX,
        secagg=SECAGG,
    )
    server = FederatedServer(server_side, digits_bundle, config)  # type: ignore[arg-type]
    snapshots: list[tuple[RoundResult, dict[str, np.ndarray]]] = []
    started = time.monotonic()
    try:
        server.start()
        v0 = {k: np.array(v, dtype=np.float64) for k, v in server.weights.items()}
        results = server.run(lambda r: snapshots.append((r, {k: np.array(v) for k, v in server.weights.items()})))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        server.close()
        for link in links.values():
            link.close()
    elapsed = time.monotonic() - started
    rejections = list(server.rejections)
    assert [(r.round, r.completed, r.reported) for r in results] == [(1, True, 7), (2, False, 0), (3, True, 10)], (
        results,
        rejections,
    )
    assert "only 6 devices" in results[1].reason and results[1].model_version == 1, results[1]
    specs = digits_bundle.manifest.aggregated_tensors
    unit = float(np.mean([len(d) for d in devices]))  # every buffer's cohort is all 10: W is their mean count

    # buffer 1: the 7 survivors' example-weighted FedAvg, within the quantization bound
    expected, total = fedavg(updates, 1, names[:7], specs)
    assert results[0].num_examples == total
    bound = weighted_bound(7, ring_spec_for(10, clip=SECAGG["clip"], quant_bits=16), unit, total)
    v1 = snapshots[0][1]
    for spec in specs:
        error = float(np.abs(v1[spec.name].astype(np.float64) - v0[spec.name] - expected[spec.name]).max())
        assert error < bound + 1e-6, (spec.name, error, bound)
    assert float(np.abs(v1[specs[0].name] - v0[specs[0].name]).max()) > 10 * bound  # it did move

    # buffer 2 aborted: the model is still v1, nobody was asked to unmask, every device re-tasked
    for name, value in snapshots[1][1].items():
        np.testing.assert_array_equal(value, v1[name])
    assert {r for r, kind in server_side.sent if kind == UNMASK_REQUEST} == {1, 3}
    assert all((3, name) in updates for name in names)

    # buffer 3: all 10, on v1
    expected, total = fedavg(updates, 3, names, specs)
    bound = weighted_bound(10, ring_spec_for(10, clip=SECAGG["clip"], quant_bits=16), unit, total)
    for spec in specs:
        moved = server.weights[spec.name].astype(np.float64) - v1[spec.name].astype(np.float64)
        assert float(np.abs(moved - expected[spec.name]).max()) < bound + 1e-6, spec.name
    assert server.model_version == 2
    assert {r.code for r in rejections} <= {"contract_violation"}, rejections
    print(f"secure FedBuff over Mosquitto: {elapsed:.1f}s")
