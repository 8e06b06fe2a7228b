"""ModelUpdater: announcement -> FETCH -> staged chunks -> install, against a real store and staging.

The server end is a real :class:`ChunkSender` driven in process, so acks, skip-ahead and
go-back-N behave as on the wire; the MQTT round trip is tests/integration/test_ota_download.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import NonFiniteLoss, TrainingError
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import InstallReport, ModelStore
from edge_agent.ota.updater import DOWNLOAD_STAGE, REFUSED_FILE, ModelUpdater, UpdaterConfig
from edge_agent.protocol.chunks import ChunkSender
from edge_agent.protocol.messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    FetchMessage,
    decode_message,
)
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from tests.edge_agent.ota import Release, evaluate_loss

DEVICE, CHUNK = "dev-1", 4096
TIMEOUT = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStaging(DownloadStaging):
    """DownloadStaging that records the index of every chunk it actually stores."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[int] = []

    def write_chunk(self, transfer_id: str, index: int, data: bytes) -> int:
        before = self.next_index(transfer_id)
        after = super().write_chunk(transfer_id, index, data)
        if after > before:
            self.written.append(index)
        return after


def accept(bundle: Bundle) -> None:
    return None


class Device:
    """One device's store, staging and updater under ``root`` (a new Device = a restart)."""

    def __init__(self, root: Path, v1: Release, *, validate=accept, **config) -> None:
        self.clock = Clock()
        self.store = ModelStore(root / "store").open()
        if self.store.current() is None:
            assert self.store.install_directory(1, v1.directory, validate=accept).ok
        self.staging = CountingStaging(root / "downloads")
        config = {"chunk_size": CHUNK, "fetch_timeout_s": TIMEOUT} | config
        self.updater = ModelUpdater(
            DEVICE, Topics(), self.store, self.staging, validate, config=UpdaterConfig(**config), clock=self.clock
        )

    def version(self) -> tuple[int, str]:
        current = self.store.current()
        assert current is not None
        return current.version, current.digest


def announcement(release: Release, version: int = 2, **changes: Any) -> ModelMessage:
    """What the server announces for ``release`` as ``version`` (fields overridable)."""
    model = ModelMessage(
        channel="current",
        version=version,
        bundle_digest=release.digest,
        archive_sha256=_sha(release.archive),
        archive_size=len(release.archive),
    )
    return dataclasses.replace(model, **changes)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Sender:
    """The server end of one transfer (what TransferLink does on the server, minus MQTT)."""

    def __init__(self, archive: bytes, *, version: int = 2, transfer_id: str = "t1", sha256: str | None = None):
        self.chunks = ChunkSender(
            archive, transfer_id=transfer_id, chunk_size=CHUNK, device_id=DEVICE, round=-1, task_id=f"model-v{version}"
        )
        self.transfer_id = transfer_id
        self.sha256 = sha256  # claim this digest instead of the data's (a corrupted transfer)
        self.now = 0.0
        self.acks: list[ChunkAck] = []

    def run(self, updater: ModelUpdater, *, stop=lambda: False, steps: int = 10_000) -> InstallReport | None:
        report = None
        for _ in range(steps):
            self.now += 0.01
            for chunk in self.chunks.due(self.now):
                if stop():
                    return report
                if self.sha256 is not None:
                    chunk = dataclasses.replace(chunk, sha256=self.sha256)
                ack_bytes, outcome = updater.on_chunk(chunk)
                report = outcome or report
                assert ack_bytes is not None
                ack = decode_message(ack_bytes)
                assert isinstance(ack, ChunkAck) and ack.device_id == DEVICE and ack.transfer_id == self.transfer_id
                self.acks.append(ack)
                self.chunks.on_ack(ack, self.now)
            if self.chunks.done or self.chunks.failed:
                return report
        raise AssertionError("transfer neither finished nor failed")


def staged_files(device: Device) -> list[str]:
    return sorted(p.name for p in device.staging.root.iterdir()) if device.staging.root.exists() else []


def test_announcements_that_should_not_be_installed_are_ignored(tmp_path: Path, v1: Release, v2: Release) -> None:
    device = Device(tmp_path, v1, max_archive_bytes=len(v2.archive) - 1)
    assert not device.updater.announced(announcement(v2, channel="canary"))
    assert not device.updater.announced(announcement(v2, version=1))  # not newer than installed v1
    assert not device.updater.announced(announcement(v1, version=5))  # the digest is installed already
    assert not device.updater.announced(announcement(v2))  # archive above the device's limit
    assert not device.updater.announced(announcement(v2, archive_size=10**12))
    assert device.updater.pending is None and device.updater.due_fetch(True) is None
    assert staged_files(device) == []  # nothing allocated or created for any of them


def test_fetch_is_sent_when_allowed_and_not_repeated_until_the_timeout(tmp_path: Path, v1: Release, v2: Release):
    device = Device(tmp_path, v1)
    assert device.updater.announced(announcement(v2))
    assert device.updater.due_fetch(False) is None  # the gate says no
    fetch = decode_message(device.updater.due_fetch(True) or b"")
    assert fetch == FetchMessage(device_id=DEVICE, channel="current", version=2, chunk_size=CHUNK)
    assert device.updater.announced(announcement(v2))  # the retained message again: nothing resets
    device.clock.now += TIMEOUT - 1
    assert device.updater.due_fetch(True) is None
    device.clock.now += 1
    assert device.updater.due_fetch(True) is not None  # no chunk came: ask again
    device.clock.now += TIMEOUT
    assert device.updater.due_fetch(True) is None  # unanswered: the wait doubles
    device.clock.now += TIMEOUT
    assert device.updater.due_fetch(True) is not None
    # a stored chunk is progress: the next FETCH waits one timeout from it
    Sender(v2.archive).run(device.updater, stop=lambda: len(device.staging.written) >= 1)
    assert device.updater.due_fetch(True) is None
    device.clock.now += TIMEOUT
    assert device.updater.due_fetch(True) is not None


def test_a_download_in_many_chunks_installs_the_new_version(tmp_path: Path, v1: Release, v2: Release) -> None:
    device = Device(tmp_path, v1, validate=evaluate_loss)
    assert device.updater.announced(announcement(v2))
    sender = Sender(v2.archive)
    report = sender.run(device.updater)
    assert sender.chunks.done and sender.chunks.count >= 10
    assert report is not None and report.ok and report.stage == "done" and report.version == 2
    assert device.version() == (2, v2.digest)
    assert device.staging.written == list(range(sender.chunks.count))  # each chunk stored once
    assert sender.acks[-1].status == ACK_COMPLETE and sender.acks[-1].next == sender.chunks.count
    assert staged_files(device) == []  # the staged archive is removed after the install
    assert device.updater.pending is None and device.updater.due_fetch(True) is None
    # the last chunk re-sent (our COMPLETE lost) is acknowledged COMPLETE again, not installed twice
    first = Sender(v2.archive).chunks.due(0.0)[0]
    last = sender.chunks.count - 1
    resent = dataclasses.replace(first, index=last, data=v2.archive[last * CHUNK :])
    ack_bytes, report = device.updater.on_chunk(resent)
    assert report is None
    ack = decode_message(ack_bytes or b"")
    assert isinstance(ack, ChunkAck) and ack.status == ACK_COMPLETE


def test_a_restarted_device_resumes_and_stores_only_the_remaining_chunks(tmp_path: Path, v1: Release, v2: Release):
    first = Device(tmp_path, v1)
    assert first.updater.announced(announcement(v2))
    cut = 7
    Sender(v2.archive).run(first.updater, stop=lambda: len(first.staging.written) >= cut)
    assert first.staging.written == list(range(cut)) and first.version()[0] == 1

    second = Device(tmp_path, v1)  # a restart: new objects on the same directories
    assert second.updater.announced(announcement(v2))  # the retained MODEL arrives again
    assert second.updater.due_fetch(True) is not None
    sender = Sender(v2.archive)  # the server starts a new transfer from chunk 0
    report = sender.run(second.updater)
    assert report is not None and report.ok and second.version() == (2, v2.digest)
    assert second.staging.written == list(range(cut, sender.chunks.count))
    assert (sender.acks[0].status, sender.acks[0].next) == (ACK_OK, cut)  # the sender skips ahead
    assert sender.chunks.sent <= sender.chunks.count - cut + sender.chunks.window


def test_a_download_staged_completely_before_a_crash_installs_on_the_next_chunk(tmp_path, v1, v2) -> None:
    first = Device(tmp_path, v1)
    assert first.updater.announced(announcement(v2))
    sender = Sender(v2.archive)
    count = sender.chunks.count
    first.staging.begin("model-v2", len(v2.archive), CHUNK, _sha(v2.archive))
    for index in range(count):  # as if the process died right after the last write
        first.staging.write_chunk("model-v2", index, v2.archive[index * CHUNK : (index + 1) * CHUNK])

    second = Device(tmp_path, v1)
    assert second.updater.announced(announcement(v2))
    report = sender.run(second.updater)
    assert report is not None and report.ok and second.version() == (2, v2.digest)
    assert second.staging.written == [] and sender.chunks.done


def test_a_corrupt_download_is_discarded_retried_with_backoff_and_then_given_up(tmp_path, v1, v2) -> None:
    device = Device(tmp_path, v1, max_attempts=2)
    model = announcement(v2)
    corrupt = bytearray(v2.archive)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert device.updater.announced(model)
    assert device.updater.due_fetch(True) is not None
    sender = Sender(bytes(corrupt), sha256=model.archive_sha256)
    report = sender.run(device.updater)
    assert report is not None and not report.ok
    assert (report.stage, report.code) == (DOWNLOAD_STAGE, "integrity_error")
    assert sender.chunks.failed is not None and sender.acks[-1].status == ACK_REJECTED
    assert device.version() == (1, v1.digest)  # the previous model is kept
    assert staged_files(device) == []  # the bad archive is gone
    assert device.updater.pending == model
    assert device.updater.due_fetch(True) is None  # backing off ...
    device.clock.now += TIMEOUT
    assert device.updater.due_fetch(True) is not None  # ... then fetching again
    report = Sender(bytes(corrupt), sha256=model.archive_sha256).run(device.updater)
    assert report is not None and report.code == "integrity_error"
    assert device.updater.pending is None  # max_attempts reached: given up until a restart
    assert not device.updater.announced(model)
    assert Device(tmp_path, v1).updater.announced(model)  # a restart tries again


def test_an_archive_that_does_not_install_is_refused_across_restarts(tmp_path, v1, v2, v3) -> None:
    device = Device(tmp_path, v1)
    truncated = v2.archive[: len(v2.archive) // 2]  # cut inside a member: unpack refuses it
    model = announcement(v2, archive_sha256=_sha(truncated), archive_size=len(truncated))
    assert device.updater.announced(model)
    report = Sender(truncated).run(device.updater)
    assert report is not None and not report.ok and report.stage == "unpack"
    assert device.version() == (1, v1.digest) and staged_files(device) == [REFUSED_FILE]
    assert not device.updater.announced(model)
    assert not Device(tmp_path, v1).updater.announced(model)  # persisted
    # a bundle whose manifest is not the announced digest is refused at the digest check
    lying = announcement(v3, bundle_digest=v2.digest, version=3)
    restarted = Device(tmp_path, v1)
    assert restarted.updater.announced(lying)
    report = Sender(v3.archive, version=3).run(restarted.updater)
    assert report is not None and report.stage == "digest" and report.code == "integrity_error"
    assert restarted.version() == (1, v1.digest)
    refused = json.loads((restarted.staging.root / REFUSED_FILE).read_text())["refused"]
    assert refused == [[2, v2.digest], [3, v2.digest]]


def test_rollback_restores_the_previous_model_and_refuses_the_bad_one(tmp_path, v1, v2, v3) -> None:
    device = Device(tmp_path, v1)
    assert device.updater.announced(announcement(v2))
    report = Sender(v2.archive).run(device.updater)
    assert report is not None and report.ok and device.version() == (2, v2.digest)

    rolled = device.updater.rollback("loss became nan")
    assert rolled.ok and rolled.version == 1 and rolled.previous_version == 2
    assert device.version() == (1, v1.digest)
    assert not device.updater.announced(announcement(v2))  # the retained v2 must not come back
    assert not Device(tmp_path, v1).updater.announced(announcement(v2))
    assert device.updater.announced(announcement(v3, version=3))  # a newer release is welcome
    assert not device.updater.rollback("again").ok  # nothing older left


def test_chunks_are_refused_when_paused_or_not_the_announced_archive(tmp_path, v1, v2, v3) -> None:
    device = Device(tmp_path, v1)
    chunk = ChunkSender(v2.archive, transfer_id="t1", chunk_size=CHUNK, device_id=DEVICE, round=-1, task_id="model-v2")
    first: ChunkMessage = chunk.due(0.0)[0]

    def answer(message: ChunkMessage, **kwargs) -> ChunkAck:
        ack_bytes, report = device.updater.on_chunk(message, **kwargs)
        assert report is None
        ack = decode_message(ack_bytes or b"")
        assert isinstance(ack, ChunkAck)
        return ack

    assert answer(first).status == ACK_REJECTED  # nothing announced
    assert device.updater.announced(announcement(v2))
    assert device.updater.due_fetch(True) is not None
    paused = answer(first, may_download=False)
    assert (paused.status, paused.reason) == (ACK_REJECTED, "download paused by the device's policy")
    assert device.updater.due_fetch(False) is None
    assert device.updater.due_fetch(True) is not None  # allowed again: FETCH at once, not after the timeout
    other = dataclasses.replace(first, sha256=_sha(v3.archive))
    assert answer(other).status == ACK_REJECTED
    assert answer(dataclasses.replace(first, task_id="model-v3")).status == ACK_REJECTED
    assert device.staging.written == []
    assert answer(first).status == ACK_OK and device.staging.written == [0]
    gap = answer(dataclasses.replace(first, index=2, data=v2.archive[2 * CHUNK : 3 * CHUNK]))
    assert (gap.status, gap.next) == ("resend", 1) and device.staging.written == [0]
    assert device.updater.on_chunk(dataclasses.replace(first, device_id="dev-2")) == (None, None)
    with pytest.raises(ValueError, match="not a model download"):
        device.updater.on_chunk(dataclasses.replace(first, round=1))


def test_an_error_about_the_pending_fetch_backs_off(tmp_path: Path, v1: Release, v2: Release) -> None:
    device = Device(tmp_path, v1)
    assert device.updater.announced(announcement(v2))
    assert device.updater.due_fetch(True) is not None
    unrelated = ErrorMessage(device_id=DEVICE, round=-1, task_id="model-v9", code="contract_violation", reason="x")
    assert not device.updater.on_error(unrelated)
    refusal = dataclasses.replace(unrelated, task_id="model-v2", reason="model version 2 is not available")
    assert device.updater.on_error(refusal)
    device.clock.now += TIMEOUT - 1
    assert device.updater.due_fetch(True) is None
    device.clock.now += 1
    assert device.updater.due_fetch(True) is not None


def test_a_newer_announcement_replaces_a_pending_one_and_its_staged_chunks(tmp_path, v1, v2, v3) -> None:
    device = Device(tmp_path, v1)
    assert device.updater.announced(announcement(v2))
    Sender(v2.archive).run(device.updater, stop=lambda: len(device.staging.written) >= 3)
    assert "model-v2.part" in staged_files(device)
    assert device.updater.announced(announcement(v3, version=3))
    assert staged_files(device) == []  # the superseded partial download is removed
    fetch = decode_message(device.updater.due_fetch(True) or b"")
    assert isinstance(fetch, FetchMessage) and fetch.version == 3
    report = Sender(v3.archive, version=3).run(device.updater)
    assert report is not None and report.ok and device.version() == (3, v3.digest)


def test_a_new_model_whose_loss_diverges_is_rolled_back(tmp_path: Path, v1: Release, v2: Release) -> None:
    """The agent's recipe: train with the installed model; NonFiniteLoss -> rollback."""
    device = Device(tmp_path, v1, validate=evaluate_loss)
    assert device.updater.announced(announcement(v2))
    report = Sender(v2.archive).run(device.updater)
    assert report is not None and report.ok
    current = device.store.current()
    assert current is not None
    bundle = Bundle.open(current.path)
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    y = np.arange(32, dtype=np.int64) % 10
    with pytest.raises(NonFiniteLoss) as failure:
        OrtTrainer.open(bundle).train(
            bundle.initial_weights(), x, y, epochs=2, batch_size=8, lr=1e30, rng=np.random.default_rng(0)
        )
    assert failure.value.code == "non_finite_loss" and isinstance(failure.value, TrainingError)
    rolled = device.updater.rollback(failure.value.reason)
    assert rolled.ok and device.version() == (1, v1.digest) and "nan" in rolled.reason


def test_accepts_and_handle_route_exactly_the_updaters_messages(tmp_path: Path, v1: Release, v2: Release) -> None:
    device = Device(tmp_path, v1)
    updater = device.updater
    model = announcement(v2)
    chunk = Sender(v2.archive).chunks.due(0.0)[0]
    refusal = ErrorMessage(device_id=DEVICE, round=-1, task_id="model-v2", code="contract_violation", reason="x")
    task_chunk = dataclasses.replace(chunk, round=4, task_id="r4-abc")  # a large TASK: the agent's own link
    foreign = dataclasses.replace(chunk, device_id="dev-2")
    task_error = dataclasses.replace(refusal, round=3, task_id="r3-x")
    assert [updater.accepts(m) for m in (model, chunk, refusal)] == [True, True, True]
    assert [updater.accepts(m) for m in (task_chunk, foreign, task_error)] == [False, False, False]
    assert not updater.accepts(FetchMessage(device_id=DEVICE, channel="current", version=2, chunk_size=CHUNK))

    assert updater.handle(model) == (None, None) and updater.pending == model
    ack_bytes, report = updater.handle(chunk)
    ack = decode_message(ack_bytes or b"")
    assert report is None and isinstance(ack, ChunkAck) and (ack.status, ack.next) == (ACK_OK, 1)
    assert updater.due_fetch(True) is None  # progress just happened
    assert updater.handle(refusal) == (None, None)
    device.clock.now += TIMEOUT
    assert updater.due_fetch(True) is not None
    with pytest.raises(ValueError, match="not for the model updater"):
        updater.handle(ChunkAck(device_id=DEVICE, round=-1, task_id="model-v2", transfer_id="t1", next=0))
