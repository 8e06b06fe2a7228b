"""A running server, over a real Mosquitto, facing a device that sends every kind of bad message.

The rogue device answers its task with malformed, truncated, unknown-version, mis-addressed,
wrong-shape, non-finite, truncated-payload, unknown-codec and not-offered-codec updates before a
valid one. The server must log a reason for each,
keep running, accept the valid updates exactly once and finish the round.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.presence import offline_will
from edge_agent.protocol.messages import (
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url
from tests.fixtures import digits_split

PREFIX = Topics("malformed/v1")
NAN_CODE, NAN_PHRASE = "malformed_message", "non-finite"


def transport(url: str, client_id: str, **kw) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id, **kw))


def _payload(delta: dict[str, np.ndarray], codec: str = "fp32") -> bytes:
    return encode_update(delta, CodecSpec.parse(codec), rng=np.random.default_rng(0))


def bad_updates(task: TaskMessage, good: UpdateMessage, zeros: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    """(expected rejection code, payload) pairs, all published on the rogue's own results topic."""
    valid = encode_message(good)
    name = next(iter(zeros))
    wrong_shape = encode_update(
        {**zeros, name: np.zeros((3, 3), np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0)
    )
    marked = {**zeros, name: np.full(zeros[name].shape, 1234.5, np.float32)}
    nan = _payload(marked).replace(struct.pack("<f", 1234.5), struct.pack("<f", float("nan")), 1)
    unknown_codec = bytearray(good.payload)
    unknown_codec[5] = 200

    def variant(**changes: object) -> bytes:
        return encode_message(UpdateMessage(**{**vars(good), **changes}))  # type: ignore[arg-type]

    return [
        ("malformed_message", b"\x00\x01garbage"),
        ("malformed_message", valid[: len(valid) // 2]),
        ("unsupported_version", valid[:4] + bytes([9]) + valid[5:]),
        ("malformed_message", valid[:8] + struct.pack("<I", 10**6) + valid[12:]),
        ("cross_device", variant(device_id="somebody-else")),
        ("contract_violation", variant(payload=wrong_shape)),
        (NAN_CODE, variant(payload=nan)),
        ("malformed_message", variant(payload=good.payload[: len(good.payload) // 2])),
        ("unsupported_version", variant(payload=bytes(unknown_codec))),
        ("contract_violation", variant(codec="sign", payload=_payload(zeros, "sign"))),  # not offered
        ("cross_round", variant(task_id="invented")),
        ("bad_nonce", variant(nonce="f" * 32)),
        ("wrong_base", variant(base_digest="0" * 64)),
        ("cross_round", variant(round=task.round + 7)),
    ]


def rogue_device(url: str, bundle, stop: threading.Event, sent: list[str]) -> None:
    rogue = transport(url, "rogue", will=offline_will("rogue", PREFIX))
    rogue.start()
    rogue.subscribe(PREFIX.tasks("rogue"))
    rogue.publish(
        PREFIX.status("rogue"),
        encode_message(StatusMessage(device_id="rogue", online=True, bundle_digest=bundle.digest, num_examples=10)),
        retain=True,
    )
    try:
        while not stop.is_set():
            inbound = rogue.receive(timeout=0.2)
            if inbound is None:
                continue
            task = decode_message(inbound.payload)
            assert isinstance(task, TaskMessage)
            zeros = {t.name: np.zeros(t.shape, np.float32) for t in bundle.manifest.aggregated_tensors}
            good = UpdateMessage(
                device_id="rogue",
                round=task.round,
                task_id=task.task_id,
                model_version=task.model_version,
                num_examples=10,
                nonce=task.nonce,
                base_digest=task.weights_digest,
                payload=_payload(zeros),
            )
            for code, payload in bad_updates(task, good, zeros):
                rogue.publish(PREFIX.results("rogue"), payload)
                sent.append(code)
            rogue.publish(PREFIX.results("rogue"), encode_message(good))
            rogue.publish(PREFIX.results("rogue"), encode_message(good))  # a duplicate: counted once
            return
    finally:
        rogue.close()


@pytest.mark.timeout(120)
def test_server_survives_bad_messages_and_keeps_accepted_updates(mosquitto, digits_bundle) -> None:
    devices, _ = digits_split(2)
    honest = Agent(
        AgentConfig(device_id="honest", topics=PREFIX),
        transport(mosquitto.url, "honest", will=offline_will("honest", PREFIX)),
        OrtTrainer.open(digits_bundle),
        devices[0],
    )
    stop, sent = threading.Event(), []
    honest.start()
    threads = [
        threading.Thread(target=honest.run, args=(stop,), daemon=True),
        threading.Thread(target=rogue_device, args=(mosquitto.url, digits_bundle, stop, sent), daemon=True),
    ]
    for thread in threads:
        thread.start()
    server = FederatedServer(
        transport(mosquitto.url, "malformed-server"),
        digits_bundle,
        ServerConfig(
            rounds=2, clients_per_round=2, min_clients=2, wait_for_clients_s=30, round_timeout_s=30, topics=PREFIX
        ),
    )
    try:
        server.start()
        # junk on a status topic and on a topic outside the layout is rejected, not fatal
        junk = transport(mosquitto.url, "junk")
        junk.start()
        junk.publish(PREFIX.status("junk"), b"FFLK\x01\x01\x00\x00\x02\x00\x00\x00{}")
        junk.close()
        first = server.run_round(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        honest.close()
    try:
        assert first.completed and first.reported == 2, (first, list(server.rejections))
        assert first.num_examples == len(devices[0]) + 10  # honest + exactly one copy of the rogue's update
        codes = [r.code for r in server.rejections if r.device_id == "rogue"]
        assert sorted(codes) == sorted(sent), (codes, sent)
        assert any(r.device_id == "junk" and "lacks field" in r.reason for r in server.rejections)
        reasons = " | ".join(r.reason for r in server.rejections)
        for phrase in (
            "truncated",
            "version 9",
            "header length",
            "somebody-else",
            "shape",
            NAN_PHRASE,
            "not offered",
            "unknown codec id 200",
            "not a task of round",
            "another task's nonce",
            "trained from weights",
            "round",
        ):
            assert phrase in reasons, (phrase, reasons)
        assert server.model_version == 1
    finally:
        server.close()
