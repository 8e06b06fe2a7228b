"""Replays against a running server over a real Mosquitto: captured UPDATEs published again are refused.

Device ``a`` is a real :class:`Agent` (onnxruntime training); ``b`` is scripted by the test, so a
round stays open until the test lets ``b`` answer. A spy captures ``a``'s genuine UPDATE
envelopes; an attacker client publishes them again: the round-2 update once more (a QoS 1
duplicate: idempotent, no rejection), the round-1 update into round 2 (``replayed``), with its
header's round rewritten (``cross_round``), under ``b``'s topic with a forged header
(``cross_device``: the ACL stops that in production, the server refuses it anyway), and the
round-1 update again in round 3 (``replayed``, counted once).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.protocol.messages import StatusMessage, TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url
from tests.fixtures import digits_split

PREFIX = Topics("replay/v1")


def transport(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Scripted:
    """Device ``b``: answers each TASK with a valid, bound zero update when the test says so."""

    def __init__(self, url: str, bundle: Bundle) -> None:
        self.link = transport(url, "b")
        self.bundle = bundle
        self.tasks: queue.Queue[TaskMessage] = queue.Queue()
        self.stopped = threading.Event()

    def start(self) -> None:
        self.link.start()
        self.link.subscribe(PREFIX.tasks("b"), qos=1)
        status = StatusMessage(device_id="b", online=True, bundle_digest=self.bundle.digest, num_examples=10)
        self.link.publish(PREFIX.status("b"), encode_message(status), qos=1, retain=True)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self.stopped.is_set():  # a closed link returns at once: never spin after close
            inbound = self.link.receive(timeout=0.2)
            if inbound is not None:
                task = decode_message(inbound.payload)
                assert isinstance(task, TaskMessage)
                self.tasks.put(task)

    def answer(self, task: TaskMessage) -> None:
        zeros = {t.name: np.zeros(t.shape, np.float32) for t in self.bundle.manifest.aggregated_tensors}
        update = UpdateMessage(
            device_id="b",
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=10,
            nonce=task.nonce,
            base_digest=task.weights_digest,
            payload=encode_update(zeros, CodecSpec("fp32"), rng=np.random.default_rng(0)),
        )
        self.link.publish(PREFIX.results("b"), encode_message(update), qos=1)


class Spy:
    """Captures the raw UPDATE envelopes device ``a`` publishes, by round."""

    def __init__(self, url: str) -> None:
        self.link = transport(url, "spy")
        self.captured: dict[int, bytes] = {}
        self.stopped = threading.Event()

    def start(self) -> None:
        self.link.start()
        self.link.subscribe(PREFIX.results("a"), qos=1)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self.stopped.is_set():  # a closed link returns at once: never spin after close
            inbound = self.link.receive(timeout=0.2)
            if inbound is not None:
                message = decode_message(inbound.payload)
                if isinstance(message, UpdateMessage):
                    self.captured.setdefault(message.round, bytes(inbound.payload))


def forged(envelope: bytes, **changes: object) -> bytes:
    """``envelope`` re-encoded with header fields changed (payload, nonce and digest untouched)."""
    message = decode_message(envelope)
    assert isinstance(message, UpdateMessage)
    return encode_message(dataclasses.replace(message, **changes))  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_replayed_cross_round_and_cross_device_updates_are_refused_and_duplicates_are_not(
    mosquitto, digits_bundle
) -> None:
    data, _ = digits_split(1)
    agent = Agent(
        AgentConfig(device_id="a", topics=PREFIX),
        transport(mosquitto.url, "a"),
        OrtTrainer.open(digits_bundle),
        data[0],
    )
    bundle: Bundle = digits_bundle
    b, spy, attacker = Scripted(mosquitto.url, bundle), Spy(mosquitto.url), transport(mosquitto.url, "attacker")
    config = ServerConfig(
        rounds=3, clients_per_round=2, min_clients=2, wait_for_clients_s=30, round_timeout_s=60, topics=PREFIX
    )
    server = FederatedServer(transport(mosquitto.url, "replay-server"), digits_bundle, config)
    stop = threading.Event()
    for part in (b, spy, attacker):
        part.start()
    agent.start()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    try:
        server.start()

        def run(number: int, inject: Callable[[], None]) -> None:
            results: list[object] = []
            thread = threading.Thread(target=lambda: results.append(server.run_round(number)), daemon=True)
            thread.start()
            task = b.tasks.get(timeout=30)
            wait_for(lambda: number in spy.captured, f"a's round-{number} update")
            inject()
            b.answer(task)
            thread.join(timeout=60)
            result = results[0]
            assert result.completed and result.reported == 2, (result, list(server.rejections))  # type: ignore[attr-defined]
            assert result.num_examples == len(data[0]) + 10  # type: ignore[attr-defined]

        def codes() -> list[str]:
            return sorted(r.code for r in server.rejections)

        run(1, lambda: None)
        assert codes() == []
        first = spy.captured[1]

        def round_two() -> None:
            attacker.publish(PREFIX.results("a"), spy.captured[2], qos=1)  # a QoS 1 duplicate: ignored
            attacker.publish(PREFIX.results("a"), first, qos=1)  # round 1's update, replayed
            attacker.publish(PREFIX.results("a"), forged(first, round=2), qos=1)  # its round rewritten
            attacker.publish(PREFIX.results("b"), forged(first, device_id="b"), qos=1)  # under b's identity
            wait_for(lambda: len(server.rejections) == 3, "3 rejections")

        run(2, round_two)
        assert codes() == ["cross_device", "cross_round", "replayed"], list(server.rejections)

        def round_three() -> None:
            attacker.publish(PREFIX.results("a"), first, qos=1)  # round 1's update, two rounds later
            wait_for(lambda: len(server.rejections) == 4, "4 rejections")

        run(3, round_three)
        assert codes() == ["cross_device", "cross_round", "replayed", "replayed"], list(server.rejections)
        assert server.model_version == 3
    finally:
        stop.set()
        runner.join(timeout=20)
        agent.close()
        b.stopped.set()
        spy.stopped.set()
        for link in (b.link, spy.link, attacker):
            link.close()
        server.close()
