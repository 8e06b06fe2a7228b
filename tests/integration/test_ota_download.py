"""A model rollout over a real Mosquitto: FederatedServer announces, a device fetches and installs.

The device side is what the agent will run: an MqttTransport subscribed to its inbox and the
model channel, a ModelUpdater fed with decoded messages, and its envelopes published on the
device's results topic. The server is a real FederatedServer pumped with ``serve``.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.ota.archive import pack_bundle
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import InstallReport, ModelStore
from edge_agent.ota.updater import ModelUpdater, UpdaterConfig
from edge_agent.protocol.messages import (
    ChunkMessage,
    ErrorMessage,
    FetchMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from tests.edge_agent.ota import derive_bundle, evaluate_loss

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

CHUNK = 4096


def mqtt(broker: MosquittoProcess, client_id: str) -> MqttTransport:
    return MqttTransport(MqttConfig(host=broker.host, port=broker.port, client_id=client_id, publish_timeout=10))


class CountingStaging(DownloadStaging):
    """Records the index of every chunk actually written to disk."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[int] = []

    def write_chunk(self, transfer_id: str, index: int, data: bytes) -> int:
        before = self.next_index(transfer_id)
        after = super().write_chunk(transfer_id, index, data)
        self.written += [index] if after > before else []
        return after


class DeviceLoop:
    """One device process: its broker connection, model store, staging and updater under ``root``."""

    def __init__(self, broker: MosquittoProcess, topics: Topics, device_id: str, root: Path, v1: Bundle) -> None:
        self.store = ModelStore(root / "models").open()
        if self.store.current() is None:
            assert self.store.install_directory(1, v1.directory, validate=evaluate_loss).ok
        self.staging = CountingStaging(root / "downloads")
        self.updater = ModelUpdater(
            device_id, topics, self.store, self.staging, evaluate_loss, config=UpdaterConfig(chunk_size=CHUNK)
        )
        self.transport = mqtt(broker, device_id)
        self.transport.subscribe(topics.tasks(device_id))
        self.transport.subscribe(self.updater.channel_topic)
        self.transport.start()
        self.fetches = self.chunks = 0

    def step(self, *, stop_after_written: int | None = None) -> InstallReport | None:
        """Handle what arrived, publish what is due; stop early once that many chunks are written."""
        report = None
        while (inbound := self.transport.receive(0)) is not None:
            message = decode_message(inbound.payload)
            assert self.updater.accepts(message), message  # the agent routes these before anything else
            self.chunks += isinstance(message, ChunkMessage)
            reply, outcome = self.updater.handle(message, may_download=True)
            if reply is not None:
                self.transport.publish(self.updater.results_topic, reply)
            report = outcome or report
            if stop_after_written is not None and len(self.staging.written) >= stop_after_written:
                return report
        if (fetch := self.updater.due_fetch(True)) is not None:
            self.fetches += 1
            self.transport.publish(self.updater.results_topic, fetch)
        return report


def run(server: FederatedServer, device: DeviceLoop, *, timeout_s: float = 30, **kwargs: int) -> InstallReport | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = device.step(**kwargs)
        if report is not None or (
            "stop_after_written" in kwargs and len(device.staging.written) >= kwargs["stop_after_written"]
        ):
            return report
        server.serve(0.005)
    raise AssertionError(f"no outcome in {timeout_s}s: {len(device.staging.written)} chunks written")


@pytest.fixture
def v2_dir(digits_bundle: Bundle, tmp_path: Path) -> Path:
    return derive_bundle(digits_bundle.directory, tmp_path / "v2", scale=0.5)


@pytest.fixture
def server(mosquitto: MosquittoProcess, digits_bundle: Bundle):
    topics = Topics(f"ota-{uuid.uuid4().hex[:8]}/v1")
    srv = FederatedServer(mqtt(mosquitto, f"srv-{uuid.uuid4().hex[:6]}"), digits_bundle, ServerConfig(topics=topics))
    srv.start()  # announces its own bundle as version 1 on "current"
    yield srv
    srv.close()


def test_a_device_fetches_and_installs_an_announced_bundle(mosquitto, server, digits_bundle, v2_dir, tmp_path) -> None:
    topics = server.config.topics
    assert server.publisher.announced("current") == 1
    announced = server.announce_model(2, v2_dir)
    v2_digest = Bundle.open(v2_dir).digest
    device_id = f"dev-{uuid.uuid4().hex[:6]}"
    device = DeviceLoop(mosquitto, topics, device_id, tmp_path / device_id, digits_bundle)
    try:
        report = run(server, device)
    finally:
        device.transport.close()
    assert report is not None and report.ok, report
    current = device.store.current()
    assert current is not None and (current.version, current.digest) == (2, v2_digest)
    count = math.ceil(announced.archive_size / CHUNK)
    assert count >= 10 and device.staging.written == list(range(count))
    assert device.fetches == 1 and server.publisher.counters["served"] == 1
    assert list(server.rejections) == []
    # a device connecting later sees the retained announcement of v2 with the archive's digest
    probe = mqtt(mosquitto, f"probe-{uuid.uuid4().hex[:6]}")
    probe.subscribe(topics.model_channel("current"))
    probe.start()
    try:
        inbound = probe.receive(5)
    finally:
        probe.close()
    assert inbound is not None
    retained = decode_message(inbound.payload)
    assert retained == announced
    assert announced.archive_sha256 == hashlib.sha256(pack_bundle(v2_dir)).hexdigest()


def test_a_download_cut_by_a_restart_resumes_from_the_staged_chunks(mosquitto, server, digits_bundle, v2_dir, tmp_path):
    topics = server.config.topics
    announced = server.announce_model(2, v2_dir)
    count = math.ceil(announced.archive_size / CHUNK)
    device_id = f"dev-{uuid.uuid4().hex[:6]}"
    first = DeviceLoop(mosquitto, topics, device_id, tmp_path / device_id, digits_bundle)
    try:
        assert run(server, first, stop_after_written=10) is None
    finally:
        first.transport.close()  # chunks and acks in flight are lost
    staged = DownloadStaging(tmp_path / device_id / "downloads").next_index("model-v2")
    assert 10 <= staged < count

    second = DeviceLoop(mosquitto, topics, device_id, tmp_path / device_id, digits_bundle)  # a restart
    try:
        report = run(server, second)
    finally:
        second.transport.close()
    assert report is not None and report.ok, report
    current = second.store.current()
    assert current is not None and current.version == 2
    assert second.staging.written == list(range(staged, count))  # only the remaining chunks
    # the new transfer's first window (duplicates, acked with next=staged) and the rest
    assert second.chunks <= count - staged + 8 + 2, (second.chunks, count, staged)
    assert server.publisher.counters["served"] == 2 and server.publisher.counters["replaced"] == 1


def test_a_fetch_for_a_version_the_server_does_not_hold_is_answered_with_an_error(mosquitto, server) -> None:
    topics = server.config.topics
    device_id = f"dev-{uuid.uuid4().hex[:6]}"
    device = mqtt(mosquitto, device_id)
    device.subscribe(topics.tasks(device_id))
    device.start()
    try:
        fetch = FetchMessage(device_id=device_id, channel="current", version=7, chunk_size=CHUNK)
        device.publish(topics.results(device_id), encode_message(fetch))
        deadline, inbound = time.monotonic() + 10, None
        while inbound is None and time.monotonic() < deadline:
            server.serve(0.02)
            inbound = device.receive(0.02)
    finally:
        device.close()
    assert inbound is not None
    error = decode_message(inbound.payload)
    assert isinstance(error, ErrorMessage)
    assert (error.device_id, error.round, error.task_id, error.code) == (
        device_id,
        -1,
        "model-v7",
        "contract_violation",
    )
    assert "not available" in error.reason
    assert [(r.device_id, r.code) for r in server.rejections] == [(device_id, "contract_violation")]
    assert server.publisher.counters["unknown_version"] == 1 and server.publisher.counters["served"] == 0
