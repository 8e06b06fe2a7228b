"""Models over the air through the agent: announcement -> gate -> FETCH -> chunks -> install -> switch.

In process and deterministic: a real :class:`FederatedServer` (pumped with ``serve``) and the
agent on one :class:`InMemoryBroker`; the real digits bundle installed as version 0 in a real
:class:`ModelStore`, a real :class:`DownloadStaging` and :class:`ModelUpdater` whose validate
hook is the config agent's (one evaluation batch). The updater's and the agent's clocks are one
fake that moves only when told (fetch backoff); the server runs on real time. A listener on the
device's results and status topics sees everything the agent publishes (delivery is synchronous).
The same flow over Mosquitto with the ``fedflock agent`` process: tests/integration/test_agent_ota_run.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.device.fake import ScriptedMonitor
from edge_agent.device.policy import Policy
from edge_agent.device.state import NetworkState
from edge_agent.ota import DownloadStaging, ModelStore, ModelUpdater, UpdaterConfig, pack_bundle
from edge_agent.ota.store import Validate
from edge_agent.ota.updater import REFUSED_FILE
from edge_agent.ota.validation import evaluation_validator
from edge_agent.presence import offline_will, online_birth
from edge_agent.protocol.messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    FetchMessage,
    Message,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import InboundMessage, Transport
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.edge_agent.ota import derive_bundle, release
from tests.fixtures import digits_split

DEVICE = "ota-dev"
TOPICS = Topics()
#: the device asks for chunks this small, so one archive (~50 KB) takes a dozen or more
CHUNK = 4096
FETCH_TIMEOUT = 30.0
WIFI = NetworkState(interface="wlan0", kind="wifi", metered=False, link_up=True)
CELLULAR = NetworkState(interface="wwan0", kind="cellular", metered=True, link_up=True)

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def data() -> Dataset:
    devices, _ = digits_split(2)
    return Dataset(devices[0].x[:160], devices[0].y[:160])


@pytest.fixture(scope="module")
def v1_dir(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second valid bundle (scaled weights: another digest) to announce as version 1."""
    return derive_bundle(digits_bundle.directory, tmp_path_factory.mktemp("v1") / "bundle", scale=0.5)


class DeviceTransport(InMemoryTransport):
    """The device's transport, with the connection state the agent asks MQTT transports for."""

    connected = True

    def is_connected(self) -> bool:
        return self.connected


class CorruptingTransport:
    """The server's transport, flipping one byte of chunk 1 of every model download it sends:
    the archive the device receives is not the one announced (its sha256 differs)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.corrupted = 0

    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        return self.inner.receive(timeout)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        message = decode_message(payload)
        if isinstance(message, ChunkMessage) and message.round == -1 and message.index == 1:
            data = bytearray(message.data)
            data[100] ^= 0xFF
            payload = encode_message(dataclasses.replace(message, data=bytes(data)))
            self.corrupted += 1
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)


class Rig:
    """One agent (store, staging, updater under ``root``) and a FederatedServer on one broker."""

    def __init__(
        self,
        bundle: Bundle,
        data: Dataset,
        root: Path,
        *,
        policy: Policy | None = None,
        network: NetworkState = WIFI,
        corrupt: bool = False,
    ) -> None:
        self.bundle, self.data, self.root = bundle, data, root
        self.policy = policy or Policy()
        self.clock = Clock()
        self.broker = InMemoryBroker()
        self.monitor = ScriptedMonitor(
            clock=self.clock, battery_percent=80.0, charging=False, memory_available_bytes=8 << 30, network=network
        )
        self.listener = InMemoryTransport(self.broker, "listener")
        self.listener.subscribe(TOPICS.results(DEVICE))
        self.listener.subscribe(TOPICS.status(DEVICE))
        self.listener.start()
        server_transport: Transport = InMemoryTransport(self.broker, "server")
        if corrupt:
            server_transport = self.corrupting = CorruptingTransport(server_transport)
        # model_channel None: the server does not announce its own bundle (the device runs it as v0)
        self.server = FederatedServer(server_transport, bundle, ServerConfig(model_channel=None, topics=TOPICS))
        self.server.start()
        self.start_agent()
        self.drain()

    def start_agent(self) -> None:
        """A new agent process on the same state (the first one installs the bundle as v0)."""
        self.store = ModelStore(self.root / "models").open()
        if self.store.current() is None:
            report = self.store.install_directory(0, self.bundle.directory, validate=self.validate())
            assert report.ok, report
        current = self.store.current()
        assert current is not None
        self.updater = ModelUpdater(
            DEVICE,
            TOPICS,
            self.store,
            DownloadStaging(self.root / "downloads"),
            self.validate(),
            config=UpdaterConfig(chunk_size=CHUNK, fetch_timeout_s=FETCH_TIMEOUT, max_attempts=2),
            clock=self.clock,
        )
        self.device = DeviceTransport(self.broker, DEVICE, will=offline_will(DEVICE))
        self.agent = Agent(
            AgentConfig(device_id=DEVICE, seed=1, state_dir=self.root / "state"),
            self.device,
            OrtTrainer.open(Bundle.open(current.path), lazy=True),
            self.data,
            clock=self.clock,
            wall_clock=self.clock,
            monitor=self.monitor,
            policy=self.policy,
            updater=self.updater,
        )
        self.agent.start()

    def validate(self) -> Validate:
        return evaluation_validator(self.data.x, self.data.y)

    def pump(self, steps: int = 40) -> None:
        """Server and agent take turns: the server answers FETCHes and acks, the agent handles
        what arrived (as its run loop does) and makes a scheduling pass."""
        for _ in range(steps):
            self.server.serve(0.002)
            while (inbound := self.device.receive(timeout=0)) is not None:
                self.agent.handle_payload(inbound.payload)
            self.agent.tick()

    def drain(self) -> list[Message]:
        """Everything the agent published since the last drain, decoded."""
        out = []
        while (inbound := self.listener.receive(timeout=0)) is not None:
            out.append(decode_message(inbound.payload))
        return out

    def retained_status(self) -> StatusMessage:
        status = decode_message(self.broker.retained()[TOPICS.status(DEVICE)])
        assert isinstance(status, StatusMessage)
        return status

    def version(self) -> tuple[int, str]:
        current = self.store.current()
        assert current is not None
        return current.version, current.digest

    def running(self) -> str:
        return self.agent.runner.trainer.bundle.digest

    def task(self, task_id: str, bundle: Bundle, *, lr: float = 0.05) -> None:
        """Send a TASK for ``bundle`` (its initial weights) and let the agent handle it."""
        self.listener.publish(TOPICS.tasks(DEVICE), task_envelope(task_id, bundle, lr=lr))
        self.pump(1)

    def close(self) -> None:
        self.agent.close()
        self.server.close()
        self.listener.close()


@pytest.fixture
def make_rig(digits_bundle: Bundle, data: Dataset, tmp_path: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**options: Any) -> Rig:
        rigs.append(Rig(digits_bundle, data, tmp_path / f"device{len(rigs)}", **options))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def task_envelope(task_id: str, bundle: Bundle, *, lr: float = 0.05) -> bytes:
    task = TaskMessage(
        device_id=DEVICE,
        round=1,
        task_id=task_id,
        model_version=0,
        bundle_digest=bundle.digest,
        epochs=1,
        batch_size=16,
        lr=lr,
        deadline_s=3600.0,
        weights=bundle.initial_weights(),
    )
    return encode_message(task)


def of(kind: type, messages: list[Message]) -> list[Any]:
    return [m for m in messages if isinstance(m, kind)]


def test_an_announced_bundle_is_fetched_in_chunks_installed_and_run(make_rig, digits_bundle, v1_dir) -> None:
    rig: Rig = make_rig()
    v1 = Bundle.open(v1_dir)
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest
    announced = rig.server.announce_model(1, v1_dir)
    rig.pump()

    assert rig.version() == (1, v1.digest)
    assert rig.running() == v1.digest  # the TaskRunner switched to the new bundle
    published = rig.drain()
    [fetch] = of(FetchMessage, published)
    assert (fetch.version, fetch.chunk_size) == (1, CHUNK)
    acks = of(ChunkAck, published)
    count = -(-announced.archive_size // CHUNK)
    assert count >= 10 and [a.status for a in acks] == [ACK_OK] * (count - 1) + [ACK_COMPLETE]
    assert [a.next for a in acks] == list(range(1, count + 1))  # each chunk stored once, in order
    status = rig.retained_status()
    assert status.online and status.bundle_digest == v1.digest
    assert status.install["ok"] is True and status.install["version"] == 1 and status.install["stage"] == "done"
    assert status.install["digest"] == v1.digest and status.install["previous_version"] == 0
    record = rig.server.registry.get(DEVICE)
    assert record is not None and record.bundle_digest == v1.digest  # the server saw it too ...
    assert rig.server.registry.eligible(digits_bundle.digest) == []  # ... so it selects it for v0 no more
    assert [p.name for p in (rig.root / "downloads").iterdir()] == []  # the staged archive is gone
    assert rig.server.publisher.counters["served"] == 1 and list(rig.server.rejections) == []

    # the new model trains; a TASK for the old bundle is refused
    rig.task("t-new", v1)
    rig.task("t-old", digits_bundle)
    results = rig.drain()
    assert [u.task_id for u in of(UpdateMessage, results)] == ["t-new"]
    [error] = of(ErrorMessage, results)
    assert error.task_id == "t-old" and error.code == "protocol_error"
    # the retained announcement, heard again by a restarted agent, is not fetched again
    rig.agent.close()
    rig.start_agent()
    rig.pump(3)
    assert of(FetchMessage, rig.drain()) == [] and rig.running() == v1.digest


def test_downloads_wait_for_an_unmetered_network(make_rig, digits_bundle, v1_dir) -> None:
    rig: Rig = make_rig(policy=Policy(unmetered_for=frozenset({"download"})), network=CELLULAR)
    announced = rig.server.announce_model(1, v1_dir)
    for _ in range(5):  # minutes pass on cellular: several FETCH timeouts
        rig.pump(2)
        rig.clock.now += 2 * FETCH_TIMEOUT
    assert rig.updater.pending == announced  # known, but not fetched
    assert of(FetchMessage, rig.drain()) == []
    assert rig.server.publisher.counters["served"] == 0
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest

    rig.monitor.set(network=WIFI)
    rig.pump()
    assert len(of(FetchMessage, rig.drain())) == 1
    assert rig.version() == (1, Bundle.open(v1_dir).digest) and rig.running() == Bundle.open(v1_dir).digest


def test_a_fetch_or_status_that_cannot_be_published_does_not_stop_the_agent(
    make_rig, digits_bundle, v1_dir, tmp_path
) -> None:
    """The broker is gone when a rollback switches models and when the gate opens for a FETCH:
    the STATUS and the FETCH are not published (logged), and the agent carries on."""
    rig: Rig = make_rig()
    v1 = Bundle.open(v1_dir)
    rig.server.announce_model(1, v1_dir)
    rig.pump()
    assert rig.version()[0] == 1
    rig.monitor.set(network=CELLULAR)
    announced = rig.server.announce_model(2, derive_bundle(v1_dir, tmp_path / "v2", scale=2.0))
    rig.pump(2)
    assert rig.updater.pending == announced

    rig.broker.close()  # every publish raises TransportError from now on
    rig.agent.handle_payload(task_envelope("t-diverge", v1, lr=1e30))  # trains, diverges, rolls back
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest
    assert rig.agent.store.sizes().pending_results == 1  # the ERROR waits for the broker
    rig.monitor.set(network=WIFI)
    rig.agent.tick()  # a FETCH of v2 is due
    rig.clock.now += FETCH_TIMEOUT
    rig.agent.tick()
    assert rig.updater.pending == announced


def test_an_archive_corrupted_on_the_way_is_discarded_retried_then_given_up(make_rig, digits_bundle, v1_dir) -> None:
    rig: Rig = make_rig(corrupt=True)
    rig.server.announce_model(1, v1_dir)
    rig.pump()
    published = rig.drain()
    assert rig.corrupting.corrupted == 1
    assert of(ChunkAck, published)[-1].status == ACK_REJECTED
    status = rig.retained_status()
    assert status.install["ok"] is False and status.install["stage"] == "download"
    assert status.install["code"] == "integrity_error" and status.install["version"] == 1
    assert status.bundle_digest == digits_bundle.digest
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest
    assert not any((rig.root / "downloads").glob("model-v1.*"))  # the bad archive was discarded
    # a reconnect: the transport's birth STATUS (no install report) replaces the retained one,
    # and the agent's next pass publishes the report again
    rig.device.connected = False
    rig.agent.tick()
    birth = online_birth(DEVICE, digits_bundle.digest, len(rig.data))
    rig.listener.publish(birth.topic, birth.payload, retain=True)
    assert rig.retained_status().install == {}
    rig.device.connected = True
    rig.agent.tick()
    assert rig.retained_status().install["stage"] == "download"

    rig.pump(3)
    assert of(FetchMessage, rig.drain()) == []  # backing off ...
    rig.clock.now += FETCH_TIMEOUT
    rig.pump()
    assert len(of(FetchMessage, rig.drain())) == 1 and rig.corrupting.corrupted == 2  # ... retried once
    assert rig.updater.pending is None  # max_attempts=2: given up (until a restart)
    rig.clock.now += 100 * FETCH_TIMEOUT
    rig.pump(3)
    assert of(FetchMessage, rig.drain()) == []
    # the old model is still the one used
    rig.task("t-old", digits_bundle)
    assert [u.task_id for u in of(UpdateMessage, rig.drain())] == ["t-old"]
    assert rig.running() == digits_bundle.digest


def flip_a_byte_in_the_onnx_file(archive: bytes) -> bytes:
    """The archive with one byte of its first ``.onnx`` member changed (the tar stays valid)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".onnx"))
    corrupt = bytearray(archive)
    corrupt[member.offset_data + member.size // 2] ^= 0xFF
    return bytes(corrupt)


def test_an_archive_with_a_modified_onnx_file_is_refused_and_the_old_model_kept(make_rig, digits_bundle, v1_dir):
    """A consistent announcement (sha256 of what is served) of an archive whose ONNX file does
    not match the manifest: it downloads fine and fails the install at ``verify``."""
    rig: Rig = make_rig()
    v1 = release(v1_dir)
    archive = flip_a_byte_in_the_onnx_file(pack_bundle(v1_dir))
    assert archive != v1.archive
    model = ModelMessage(
        channel="current",
        version=1,
        bundle_digest=v1.digest,
        archive_sha256=hashlib.sha256(archive).hexdigest(),
        archive_size=len(archive),
    )
    # a hand-made publisher (the reference one verifies bundle files before it serves them), the
    # only one: the FederatedServer would answer the FETCH with "version 1 is not available"
    rig.server.close()
    link = TransferLink(rig.listener)
    rig.listener.publish(TOPICS.model_channel("current"), encode_message(model), retain=True)
    served = 0
    for _ in range(40):
        rig.pump(1)
        for message in rig.drain():
            if isinstance(message, FetchMessage):
                served += 1
                link.send(
                    TOPICS.tasks(DEVICE), archive, device_id=DEVICE, round=-1, task_id="model-v1", chunk_size=CHUNK
                )
            elif isinstance(message, ChunkAck):
                link.handle(message, TOPICS.tasks(DEVICE))
    assert served == 1
    [transfer] = link.transfers()
    assert link.state(transfer).startswith("failed") and "verify" in link.state(transfer)
    status = rig.retained_status()
    assert status.install["ok"] is False and status.install["stage"] == "verify"
    assert status.install["code"] == "integrity_error", status.install
    assert status.bundle_digest == digits_bundle.digest
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest
    refused = json.loads((rig.root / "downloads" / REFUSED_FILE).read_text())["refused"]
    assert refused == [[1, v1.digest]]
    rig.clock.now += 100 * FETCH_TIMEOUT
    rig.pump(3)
    assert of(FetchMessage, rig.drain()) == []  # refused for good: never fetched again


def test_a_model_that_diverges_is_rolled_back_and_not_reinstalled(make_rig, digits_bundle, v1_dir) -> None:
    rig: Rig = make_rig()
    v1 = Bundle.open(v1_dir)
    rig.server.announce_model(1, v1_dir)
    rig.pump()
    assert rig.version() == (1, v1.digest) and rig.running() == v1.digest
    rig.drain()

    rig.task("t-diverge", v1, lr=1e30)
    [error] = of(ErrorMessage, rig.drain())
    assert (error.task_id, error.code) == ("t-diverge", "non_finite_loss")
    assert rig.version() == (0, digits_bundle.digest)
    assert rig.running() == digits_bundle.digest
    assert rig.store.previous() is None
    status = rig.retained_status()
    assert status.bundle_digest == digits_bundle.digest
    assert status.install["ok"] is True and status.install["version"] == 0
    assert status.install["previous_version"] == 1 and "lower the learning rate" in status.install["reason"]
    assert rig.agent.store.sizes().pending_results == 0  # the ERROR was delivered

    # the retained v1 announcement must not bring it back: not on later ticks, not when it is
    # published again, not after a restart (the refusal is on disk)
    rig.clock.now += 100 * FETCH_TIMEOUT
    rig.pump(3)
    rig.server.announce_model(1, v1_dir)
    rig.pump(3)
    rig.agent.close()
    rig.start_agent()
    rig.pump(3)
    assert of(FetchMessage, rig.drain()) == [] and rig.server.publisher.counters["served"] == 1
    assert rig.version() == (0, digits_bundle.digest) and rig.running() == digits_bundle.digest
    # and the old model trains again
    rig.task("t-after", digits_bundle)
    assert [u.task_id for u in of(UpdateMessage, rig.drain())] == ["t-after"]
