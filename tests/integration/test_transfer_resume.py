"""Chunked uploads over a real Mosquitto: resume after a reconnect, and a broker packet limit."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.errors import TransportError
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import RESULTS, Topics
from edge_agent.transfer import TransferLink
from edge_agent.transport.mqtt import MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KIB, MIB = 1024, 1024 * 1024
DEVICE = "dev-xfer"


def connect(broker: MosquittoProcess, client_id: str, topic_filter: str, publish_timeout: float = 10) -> MqttTransport:
    config = MqttConfig(host=broker.host, port=broker.port, client_id=client_id, publish_timeout=publish_timeout)
    transport = MqttTransport(config)
    transport.subscribe(topic_filter)
    transport.start()
    return transport


def update_envelope(size: int) -> bytes:
    """A real UPDATE envelope carrying ``size`` random payload bytes (the object to upload)."""
    payload = os.urandom(size)
    return encode_message(
        UpdateMessage(device_id=DEVICE, round=1, task_id="r1", model_version=0, num_examples=10, payload=payload)
    )


class Upload:
    """A device link and a server link on one broker; the device uploads on its results topic."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.topics = Topics(f"xfer-{uuid.uuid4().hex[:8]}/v1")
        self.device_client_id = f"{DEVICE}-{uuid.uuid4().hex[:6]}"
        self.server = TransferLink(connect(broker, f"srv-{uuid.uuid4().hex[:6]}", self.topics.all_devices(RESULTS)))
        self.device = TransferLink(connect(broker, self.device_client_id, self.topics.tasks(DEVICE)))
        self.received: list[bytes] = []
        self.after_device_ack: Callable[[], None] = lambda: None

    def send(self, data: bytes) -> str:
        topic = self.topics.results(DEVICE)
        return self.device.send(topic, data, device_id=DEVICE, round=1, task_id="r1", chunk_size=64 * KIB)

    def pump(self, max_wait: float) -> None:
        """Handle whatever both sides received; block up to ``max_wait`` only when both are idle."""
        deadline = time.monotonic() + max_wait
        while True:
            handled = 0
            while (inbound := self.server.transport.receive(0)) is not None:
                handled += 1
                message = decode_message(inbound.payload)
                assert isinstance(message, ChunkMessage), message
                device_id, _ = self.topics.parse(inbound.topic)
                obj = self.server.handle(message, self.topics.tasks(device_id))
                self.received += [obj] if obj is not None else []
            while (inbound := self.device.transport.receive(0)) is not None:
                handled += 1
                ack = decode_message(inbound.payload)
                assert isinstance(ack, ChunkAck), ack
                self.device.handle(ack, self.topics.results(DEVICE))
                self.after_device_ack()
            if handled or time.monotonic() >= deadline:
                return
            time.sleep(0.002)

    def close(self) -> None:
        self.server.transport.close()
        self.device.transport.close()


def test_an_upload_resumes_from_the_last_acknowledged_chunk_after_a_reconnect(mosquitto: MosquittoProcess) -> None:
    data = update_envelope(3 * MIB)
    upload = Upload(mosquitto)
    cut_at: list[int] = []
    try:
        tid = upload.send(data)
        sender = upload.device.sender(tid)
        assert sender.count == 49

        def cut_the_device_once() -> None:
            if sender.acked >= 20 and not cut_at:
                cut_at.append(sender.acked)
                upload.device.transport.close()  # in-flight chunks and acks to the device are lost
                upload.device.transport = connect(mosquitto, upload.device_client_id, upload.topics.tasks(DEVICE))
                upload.device.resume_all()

        upload.after_device_ack = cut_the_device_once
        assert upload.device.wait(tid, upload.pump, timeout_s=30), upload.device.state(tid)
        upload.pump(0.3)  # late duplicates must not deliver the object again
    finally:
        upload.close()
    assert cut_at and 20 <= cut_at[0] < sender.count
    assert len(upload.received) == 1
    assert hashlib.sha256(upload.received[0]).hexdigest() == hashlib.sha256(data).hexdigest() == sender.sha256
    decoded, original = decode_message(upload.received[0]), decode_message(data)
    assert isinstance(decoded, UpdateMessage) and isinstance(original, UpdateMessage)
    assert decoded.payload == original.payload
    assert 0 < sender.resent <= sender.window + 2, sender.resent  # resumed from ~chunk 20, not from 0
    assert upload.server.assembler.counters["completed"] == 1


class LimitedMosquitto(MosquittoProcess):
    """Mosquitto that refuses MQTT packets over 1 MiB: it disconnects a client that sends one."""

    def _config_text(self) -> str:
        return super()._config_text() + "max_packet_size 1048576\n"


def test_chunks_pass_a_1_mib_broker_packet_limit_that_refuses_the_whole_object(tmp_path: Path) -> None:
    data = update_envelope(2 * MIB)
    with LimitedMosquitto(tmp_path / "limited") as broker:
        upload = Upload(broker)
        # A separate client, as the broker drops the connection of whoever sends the big packet
        # (an MQTT 5 client learns the limit from the CONNACK and refuses at once).
        probe = connect(broker, f"probe-{uuid.uuid4().hex[:6]}", "unused/probe", publish_timeout=2)
        try:
            with pytest.raises(TransportError):
                probe.publish(upload.topics.results(DEVICE), data)
            probe.close()
            tid = upload.send(data)
            assert upload.device.wait(tid, upload.pump, timeout_s=30), upload.device.state(tid)
            upload.pump(0.2)  # anything else arriving (the whole envelope) fails the pump's assertion
        finally:
            probe.close()
            upload.close()
    assert upload.received == [data]
