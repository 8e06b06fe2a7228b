"""Secure aggregation over a real Mosquitto: 10 real agents (threads) train the digits bundle.

Round 1: 3 devices die at the masking step (their masked input never leaves them, their
connection closes): the server unmasks the sum of the 7 survivors, and the new model equals the
example-weighted FedAvg of the survivors' plaintext updates within the quantization bound.
Round 2: the 3 dead devices never advertise keys and one more dies at masking: 6 survivors are
below the threshold 7, so the round aborts, the model stays as it was and no unmasking request
is ever sent. In both rounds no masked input the server received is close to its device's update.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent
from edge_agent.agent_config import AgentConfig
from edge_agent.codecs import decode_update
from edge_agent.errors import TransportError
from edge_agent.protocol.messages import SecAggMessage, UpdateMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.secagg import decode, ring_spec_for
from edge_agent.secagg.messages import MaskedInput
from edge_agent.secagg.weighting import weighted_bound
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url
from tests.fixtures import digits_split

PREFIX = Topics("secagg-it/v1")
MASKED, UNMASK_REQUEST = 6, 7
SECAGG = {"clip": 4.0, "quant_bits": 16, "keys_timeout_s": 4, "shares_timeout_s": 15, "unmask_timeout_s": 15}


def mqtt(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


class DyingTransport:
    """A real MQTT connection; with ``die_at_masking`` set, the device dies instead of sending its
    masked input: the publish is swallowed, the connection closed and the agent's thread stopped."""

    def __init__(self, inner: MqttTransport, stop: threading.Event) -> None:
        self.inner, self.stop = inner, stop
        self.die_at_masking = False
        self.dead = False

    def start(self) -> None:
        self.inner.start()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s=None) -> None:
        if self.dead:
            raise TransportError("connection closed")
        if self.die_at_masking and payload.startswith(b"FFLK"):
            message = decode_message(payload)
            if isinstance(message, SecAggMessage) and message.kind == MASKED:
                self.dead = True
                self.stop.set()
                self.inner.close()
                return
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        if self.dead:
            time.sleep(min(timeout or 0.0, 0.05))
            return None
        return self.inner.receive(timeout=timeout)

    def close(self) -> None:
        self.inner.close()


class RecordingTransport:
    """The server's real connection, recording the SECAGG messages it receives and publishes."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        self.received: list[SecAggMessage] = []
        self.sent: list[tuple[int, int]] = []  # (round, FFSA type)

    def start(self) -> None:
        self.inner.start()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s=None) -> None:
        if payload.startswith(b"FFLK") and payload[5] == 9:
            message = decode_message(payload)
            assert isinstance(message, SecAggMessage)
            self.sent.append((message.round, message.kind))
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        inbound = self.inner.receive(timeout=timeout)
        if inbound is not None and inbound.payload.startswith(b"FFLK") and inbound.payload[5] == 9:
            message = decode_message(inbound.payload)
            if isinstance(message, SecAggMessage):
                self.received.append(message)
        return inbound

    def close(self) -> None:
        self.inner.close()


def spy_updates(agent: Agent, into: dict[tuple[int, str], UpdateMessage]) -> None:
    """Keep each device's plaintext training result (it never leaves the device in a secure round)."""
    execute = agent.runner.execute

    def spy(task, **kwargs):  # type: ignore[no-untyped-def]
        message = execute(task, **kwargs)
        if isinstance(message, UpdateMessage):
            into[message.round, message.device_id] = message
        return message

    agent.runner.execute = spy  # type: ignore[method-assign]


def masked_inputs(server_side: RecordingTransport, round_: int) -> dict[str, np.ndarray]:
    out = {}
    for message in server_side.received:
        if message.round == round_ and message.kind == MASKED:
            decoded = decode(message.payload)
            assert isinstance(decoded, MaskedInput)
            out[message.device_id] = decoded.values.astype(np.int64)
    return out


@pytest.mark.timeout(180)
def test_secure_rounds_over_mosquitto_survive_30_percent_dropouts_and_abort_below_threshold(
    mosquitto, digits_bundle
) -> None:
    devices, _ = digits_split(10, alpha=5.0, seed=3)
    names = [f"sa-{i}" for i in range(10)]
    stops = {name: threading.Event() for name in names}
    links = {name: DyingTransport(mqtt(mosquitto.url, name), stops[name]) for name in names}
    updates: dict[tuple[int, str], UpdateMessage] = {}
    agents = {}
    for i, name in enumerate(names):
        agent = Agent(
            AgentConfig(device_id=name, topics=PREFIX, seed=i),
            links[name],  # type: ignore[arg-type]
            OrtTrainer.open(digits_bundle, threads=1),
            devices[i],
        )
        spy_updates(agent, updates)
        agents[name] = agent
    for name in names[7:]:
        links[name].die_at_masking = True
    for agent in agents.values():
        agent.start()
    threads = [threading.Thread(target=a.run, args=(stops[n],), kwargs={"poll_s": 0.05}) for n, a in agents.items()]
    for thread in threads:
        thread.start()
    server_side = RecordingTransport(mqtt(mosquitto.url, "secagg-server"))
    config = ServerConfig(
        rounds=2,
        clients_per_round=10,
        min_clients=10,
        wait_for_clients_s=30,
        round_timeout_s=12,  # the masked phase waits this long for the 3 that died
        local_epochs=1,
        topics=PREFIX,
        secagg=SECAGG,
    )
    server = FederatedServer(server_side, digits_bundle, config)  # type: ignore[arg-type]
    try:
        server.start()
        before = {k: np.array(v) for k, v in server.weights.items()}
        first = server.run_round(1)
        after_first = {k: np.array(v) for k, v in server.weights.items()}
        links[names[6]].die_at_masking = True  # round 2: one more dies, 6 of the 7 live devices remain
        second = server.run_round(2)
    finally:
        for stop in stops.values():
            stop.set()
        for thread in threads:
            thread.join(timeout=30)
        server.close()
        for name in names:
            links[name].close()
    rejections = list(server.rejections)

    # round 1: the sum of the 7 survivors
    survivors = names[:7]
    assert first.completed, (first, rejections)
    assert (first.selected, first.reported) == (10, 7), first
    counts = {name: updates[1, name].num_examples for name in survivors}
    assert first.num_examples == sum(counts.values())  # Σ nᵢ, decoded exactly from the count words
    specs = digits_bundle.manifest.aggregated_tensors
    expected_shapes = {t.name: tuple(t.shape) for t in specs}
    deltas = {name: decode_update(updates[1, name].payload, expected_shapes) for name in survivors}
    unit = float(np.mean([len(d) for d in devices]))  # the weight unit: the cohort's mean count
    for name in survivors:  # no coordinate was clipped, so the bound below is the whole error
        assert max(float(np.abs(v).max()) for v in deltas[name].values()) * counts[name] / unit < SECAGG["clip"]
    total = sum(counts.values())
    bound = weighted_bound(7, ring_spec_for(10, clip=SECAGG["clip"], quant_bits=16), unit, total)
    for spec in specs:
        fedavg = sum(counts[n] * deltas[n][spec.name].astype(np.float64) for n in survivors) / total
        moved = after_first[spec.name].astype(np.float64) - before[spec.name].astype(np.float64)
        error = float(np.abs(moved - fedavg).max())
        assert error < bound + 1e-6, (spec.name, error, bound)
    assert float(np.abs(after_first[specs[0].name] - before[specs[0].name]).max()) > 10 * bound  # it did move

    # no masked input resembles its device's update: each coordinate is uniform mod 2**k
    for round_ in (1, 2):
        for name, values in masked_inputs(server_side, round_).items():
            assert name not in names[7:] and not (round_ == 2 and name == names[6])
            if round_ == 1:
                plain = np.concatenate([deltas[name][s.name].reshape(-1) for s in specs]) * counts[name] / unit
                codes = np.floor(plain * 32767 / SECAGG["clip"]) + 32767
                assert np.mean(np.abs(values[: codes.size] - codes) <= 2) < 0.01, name

    # round 2: below the threshold, aborted; nothing unmasked, the model unchanged
    assert not second.completed and "aborted" in second.reason, second
    assert [r for r, kind in server_side.sent if kind == UNMASK_REQUEST] == [1] * 7  # to round 1's survivors only
    assert server.model_version == 1
    for name, value in server.weights.items():
        np.testing.assert_array_equal(value, after_first[name])
    assert {r.code for r in rejections} <= {"contract_violation"}, rejections
