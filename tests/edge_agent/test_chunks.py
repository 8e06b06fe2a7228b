"""Chunked transfers: the pure sender/assembler state machines and TransferLink in memory."""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import random
import tracemalloc
from collections.abc import Callable

import pytest

from edge_agent.protocol.chunks import ChunkAssembler, ChunkSender, new_transfer_id
from edge_agent.protocol.header import TOKEN_PATTERN
from edge_agent.protocol.messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ACK_RESEND,
    ChunkAck,
    ChunkMessage,
    decode_message,
    encode_message,
)
from edge_agent.transfer import TransferLink
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport

KIB = 1024


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sender(data: bytes, **kw: object) -> ChunkSender:
    args: dict = {"transfer_id": "t1", "chunk_size": KIB, "device_id": "dev-1", "round": 3, "task_id": "r3"}
    return ChunkSender(data, **(args | kw))


def ack(s: ChunkSender, next_: int, status: str = ACK_OK, reason: str = "") -> ChunkAck:
    return ChunkAck(device_id=s.device_id, round=s.round, task_id=s.task_id, transfer_id=s.transfer_id, next=next_,
                    status=status, reason=reason)  # fmt: skip


def chunks_of(data: bytes, **kw: object) -> list[ChunkMessage]:
    return sender(data, window=10**6, **kw).due(0.0)


# -- sender -------------------------------------------------------------------------------


def test_transfer_ids_are_tokens_unique_and_reproducible() -> None:
    ids = {new_transfer_id() for _ in range(100)}
    assert len(ids) == 100 and all(TOKEN_PATTERN.match(i) for i in ids)
    assert new_transfer_id(random.Random(1)) == new_transfer_id(random.Random(1))


def test_chunks_cover_the_object_and_survive_the_wire() -> None:
    data = payload(5 * KIB + 7)
    chunks = chunks_of(data)
    assert [len(c.data) for c in chunks] == [KIB] * 5 + [7]
    assert b"".join(c.data for c in chunks) == data
    assert {(c.count, c.total_size, c.sha256) for c in chunks} == {(6, len(data), hashlib.sha256(data).hexdigest())}
    assert [decode_message(encode_message(c)) for c in chunks] == chunks


@pytest.mark.parametrize(
    "kw", [{"chunk_size": 1023}, {"transfer_id": "no spaces"}, {"device_id": "a/b"}, {"window": 0}]
)
def test_sender_rejects_bad_arguments(kw: dict) -> None:
    with pytest.raises(ValueError):
        sender(b"x", **kw)
    with pytest.raises(ValueError):
        sender(b"")


def test_sender_fills_the_window_and_slides_it_on_acks() -> None:
    s = sender(payload(20 * KIB), window=8)
    assert [c.index for c in s.due(0)] == list(range(8))
    assert s.due(0.1) == []
    s.on_ack(ack(s, 3), 0.2)
    assert s.acked == 3 and [c.index for c in s.due(0.2)] == [8, 9, 10]
    s.on_ack(ack(s, 20, ACK_COMPLETE), 0.3)
    assert s.done and s.acked == 20 and s.due(100) == [] and s.resent == 0 and s.failed is None


def test_go_back_n_after_an_ack_timeout() -> None:
    s = sender(payload(20 * KIB), window=4, ack_timeout_s=5)
    s.due(0)
    s.on_ack(ack(s, 2), 1)
    assert [c.index for c in s.due(1)] == [4, 5]
    assert s.due(5.9) == []  # 4.9 s since the last progress
    assert [c.index for c in s.due(6)] == [2, 3, 4, 5]  # back to the first unacknowledged chunk
    assert s.resent == 4 and s.due(7) == []


def test_rewind_when_the_receiver_lost_its_state() -> None:
    s = sender(payload(20 * KIB), window=4)
    s.due(0)
    s.on_ack(ack(s, 4), 0.1)
    s.due(0.1)
    s.on_ack(ack(s, 1), 0.2)  # stale
    assert s.acked == 4 and s.due(0.2) == []
    s.on_ack(ack(s, 0, ACK_RESEND, reason="unknown transfer t1; resend from chunk 0"), 0.2)
    assert s.acked == 0 and [c.index for c in s.due(0.2)] == [0, 1, 2, 3]


def test_a_lost_chunk_is_resent_once_not_once_per_later_chunk() -> None:
    s = sender(payload(20 * KIB), window=8)
    s.due(0)  # chunk 0 lost: chunks 1..7 all draw "next=0"
    s.on_ack(ack(s, 0, ACK_RESEND, reason="unknown transfer"), 0.1)
    assert [c.index for c in s.due(0.1)] == list(range(8))
    for _ in range(6):
        s.on_ack(ack(s, 0, ACK_RESEND, reason="unknown transfer"), 0.1)
        assert s.due(0.1) == []
    s.on_ack(ack(s, 3), 0.2)  # progress, then chunk 3 was lost
    assert [c.index for c in s.due(0.2)] == [8, 9, 10]
    s.on_ack(ack(s, 3), 0.2)  # a duplicate's ack (no reason): no rewind
    assert s.due(0.2) == []
    s.on_ack(ack(s, 3, ACK_RESEND, reason="out of order: got 4, expected 3"), 0.2)
    assert [c.index for c in s.due(0.2)] == list(range(3, 11))
    s.on_ack(ack(s, 6, ACK_RESEND, reason="out of order: got 9, expected 6"), 0.3)  # progress and a gap at once
    assert s.acked == 6 and [c.index for c in s.due(0.3)] == list(range(6, 14))


def test_failure_after_max_stalls_and_progress_resets_the_count() -> None:
    s = sender(payload(20 * KIB), ack_timeout_s=1, max_stalls=3)
    s.due(0)
    s.due(1)
    s.due(2)  # two timeouts
    s.on_ack(ack(s, 1), 2.5)  # progress: count restarts
    for t in (3.5, 4.5):
        assert s.due(t) and s.failed is None
    assert s.due(5.5) == [] and s.failed is not None and "3 timeouts" in s.failed
    s.on_ack(ack(s, 20, ACK_COMPLETE), 6)
    assert not s.done  # too late


def test_rejection_fails_with_the_receivers_reason() -> None:
    s = sender(payload(4 * KIB))
    s.due(0)
    s.on_ack(ack(s, 0, ACK_REJECTED, "too many concurrent transfers"), 0.1)
    assert s.failed == "too many concurrent transfers" and s.due(10) == []


def test_resume_resends_from_the_first_unacknowledged_chunk_at_once() -> None:
    s = sender(payload(20 * KIB), window=4, ack_timeout_s=1, max_stalls=2)
    s.due(0)
    s.on_ack(ack(s, 3), 0.1)
    s.due(0.1)
    s.due(1.2)  # one stall
    s.resume(1.3)
    assert [c.index for c in s.due(1.3)] == [3, 4, 5, 6]
    assert s.due(2.4) and s.failed is None  # the stall count was cleared (else this was stall 2)


def test_a_lost_complete_ack_is_recovered_by_resending_the_last_chunk() -> None:
    s = sender(payload(3 * KIB), ack_timeout_s=1)
    s.due(0)
    s.on_ack(ack(s, 3), 0.1)  # all held, COMPLETE lost
    assert [c.index for c in s.due(1.1)] == [2]


def test_a_failed_publish_is_retried_after_retry_s_and_not_counted_as_resent() -> None:
    s = sender(payload(20 * KIB), window=4, retry_s=0.5)
    s.due(0)
    s.publish_failed(2, 0)
    assert s.due(0.4) == [] and s.sent == 2
    assert [c.index for c in s.due(0.5)] == [2, 3] and s.resent == 0


# -- assembler ----------------------------------------------------------------------------


def feed(asm: ChunkAssembler, chunks: list[ChunkMessage], now: float = 0.0) -> list[tuple[ChunkAck, bytes | None]]:
    return [asm.receive(c, now) for c in chunks]


def test_in_order_chunks_complete_once_with_the_object() -> None:
    data = payload(5 * KIB + 1)
    asm = ChunkAssembler()
    results = feed(asm, chunks_of(data))
    assert [a.next for a, _ in results] == [1, 2, 3, 4, 5, 6]
    assert [a.status for a, _ in results] == [ACK_OK] * 5 + [ACK_COMPLETE]
    assert [o for _, o in results] == [None] * 5 + [data]
    assert asm.active == 0 and asm.counters["completed"] == 1


def test_duplicates_out_of_order_and_unknown_transfers() -> None:
    c = chunks_of(payload(5 * KIB))
    asm = ChunkAssembler()
    (a, _), (b, _) = feed(asm, [c[3], c[0]])
    assert (a.status, a.next, a.reason) == (ACK_RESEND, 0, "unknown transfer t1; resend from chunk 0")
    assert asm.active == 1 and asm.held_bytes == KIB
    (a, _), (b, _) = feed(asm, [c[0], c[2]])
    assert (a.next, a.reason) == (1, "") and (b.next, b.reason) == (1, "out of order: got 2, expected 1")
    assert asm.held_bytes == KIB  # chunk 2 was not stored
    results = feed(asm, c[1:])
    assert results[-1][0].status == ACK_COMPLETE and results[-1][1] == b"".join(x.data for x in c)
    assert [asm.counters[k] for k in ("unknown_transfer", "duplicate", "out_of_order")] == [1, 1, 1]


def test_a_huge_declared_size_is_rejected_before_anything_is_allocated() -> None:
    data = b"\0" * KIB
    chunk = ChunkMessage(device_id="d", round=1, task_id="t", transfer_id="x", index=0, count=10**12 // KIB,
                         chunk_size=KIB, total_size=10**12, sha256="0" * 64, data=data)  # fmt: skip
    asm = ChunkAssembler(max_object_bytes=1 << 20)
    tracemalloc.start()
    try:
        ack_, obj = asm.receive(chunk, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ack_.status == ACK_REJECTED and "exceeds the limit of 1048576 bytes" in ack_.reason and obj is None
    assert peak < 64 * KIB and asm.active == 0 and asm.counters["too_large"] == 1


@pytest.mark.parametrize(
    "change", [{"sha256": "f" * 64}, {"task_id": "other"}, {"round": 4}, {"total_size": 5 * KIB + 1, "count": 6}]
)
def test_inconsistent_metadata_drops_the_transfer(change: dict) -> None:
    c = chunks_of(payload(5 * KIB))
    asm = ChunkAssembler()
    feed(asm, c[:2])
    bad = dataclasses.replace(c[2], **change)
    ack_, _ = asm.receive(bad, 0)
    assert ack_.status == ACK_REJECTED and ack_.reason.startswith("inconsistent chunk metadata")
    assert asm.active == 0 and asm.receive(c[2], 0)[0].next == 0  # forgotten


def test_malformed_chunk_is_rejected() -> None:
    c = chunks_of(payload(2 * KIB))[0]
    ack_, _ = ChunkAssembler().receive(dataclasses.replace(c, data=c.data[:-1]), 0)
    assert ack_.status == ACK_REJECTED and "carries 1023 bytes" in ack_.reason


def test_digest_mismatch_is_rejected_and_dropped() -> None:
    c = [dataclasses.replace(x, sha256="a" * 64) for x in chunks_of(payload(3 * KIB))]
    asm = ChunkAssembler()
    ack_, obj = feed(asm, c)[-1]
    assert (ack_.status, ack_.reason, obj) == (ACK_REJECTED, "sha256 mismatch", None)
    assert asm.active == 0 and asm.counters["sha256_mismatch"] == 1


def test_a_completed_transfer_is_acked_complete_again_but_delivered_once() -> None:
    data = payload(3 * KIB)
    c = chunks_of(data)
    asm = ChunkAssembler(remember_completed=2)
    delivered = [o for _, o in feed(asm, [*c, c[2], c[0], c[2]]) if o is not None]
    assert delivered == [data]
    assert asm.receive(c[2], 1)[0].status == ACK_COMPLETE and asm.active == 0
    other = dataclasses.replace(c[0], sha256="b" * 64)
    assert asm.receive(other, 1)[0].status == ACK_REJECTED  # a completed id reused for another object
    for tid in ("t2", "t3"):  # the memory is a bounded LRU
        feed(asm, chunks_of(data, transfer_id=tid))
    assert asm.receive(c[2], 1)[0].next == 0


def test_concurrency_limits_per_device_and_in_total() -> None:
    asm = ChunkAssembler(max_transfers=3, max_transfers_per_device=2)
    first = {(d, t): chunks_of(payload(2 * KIB), device_id=d, transfer_id=t)[0] for d in "ab" for t in ("x", "y", "z")}
    status = {key: asm.receive(c, 0)[0] for key, c in first.items()}
    assert [s.status for s in status.values()] == [ACK_OK, ACK_OK, ACK_REJECTED, ACK_OK, ACK_REJECTED, ACK_REJECTED]
    assert status[("a", "z")].reason == status[("b", "y")].reason == "too many concurrent transfers"
    assert asm.active == 3 and asm.counters["too_many_transfers"] == 3
    budget = ChunkAssembler(max_pending_bytes=3 * KIB)
    assert budget.receive(first[("a", "x")], 0)[0].status == ACK_OK
    assert budget.receive(first[("b", "x")], 0)[0].reason == f"receiver buffer budget of {3 * KIB} bytes exhausted"


def test_another_devices_chunks_never_touch_a_transfer() -> None:
    c = chunks_of(payload(3 * KIB))
    asm = ChunkAssembler()
    feed(asm, c[:2])
    intruder = dataclasses.replace(c[2], device_id="dev-2", sha256="c" * 64)
    assert asm.receive(intruder, 0)[0].next == 0
    assert asm.receive(c[2], 0)[0].status == ACK_COMPLETE


def test_idle_transfers_expire() -> None:
    c = chunks_of(payload(3 * KIB))
    asm = ChunkAssembler(idle_timeout_s=10)
    feed(asm, c[:1], now=0)
    feed(asm, chunks_of(payload(3 * KIB), transfer_id="t9")[:1], now=5)
    assert asm.expire(10) == [] and asm.expire(10.5) == ["t1"] and asm.active == 1
    assert asm.receive(c[1], 11)[0].reason.startswith("unknown transfer") and asm.counters["expired"] == 1


class LossyChannel:
    """Drops, duplicates and delays (reorders) encoded messages with a seeded RNG."""

    def __init__(self, rng: random.Random, p: float = 0.2) -> None:
        self.rng, self.p, self.seq = rng, p, 0
        self.queue: list[tuple[float, int, bytes]] = []

    def send(self, message: ChunkMessage | ChunkAck, now: float) -> None:
        if self.rng.random() < self.p:
            return
        for _ in range(2 if self.rng.random() < self.p else 1):
            delay = 0.01 + (self.rng.uniform(0.05, 0.5) if self.rng.random() < self.p else 0)
            self.seq += 1
            heapq.heappush(self.queue, (now + delay, self.seq, encode_message(message)))

    def deliver(self, now: float) -> list:
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(decode_message(heapq.heappop(self.queue)[2]))
        return out


@pytest.mark.parametrize("seed", range(5))
def test_a_lossy_link_delivers_the_object_exactly_once_and_intact(seed: int) -> None:
    rng = random.Random(seed)
    data = payload(200 * KIB + 123, seed)
    s = sender(data, chunk_size=4 * KIB, ack_timeout_s=1.0, transfer_id=new_transfer_id(rng))
    asm, down, up, delivered, now = ChunkAssembler(), LossyChannel(rng), LossyChannel(rng), [], 0.0
    while now < 120 and s.failed is None and (not s.done or down.queue or up.queue):
        for chunk in s.due(now):
            down.send(chunk, now)
        for chunk in down.deliver(now):
            ack_, obj = asm.receive(chunk, now)
            up.send(ack_, now)
            delivered += [obj] if obj is not None else []
        for a in up.deliver(now):
            s.on_ack(a, now)
        now += 0.01
    assert s.done and s.failed is None, (s.acked, s.failed)
    assert len(delivered) == 1 and delivered[0] == data
    assert s.resent > 0 and asm.counters["duplicate"] + asm.counters["out_of_order"] > 0  # it was hostile


# -- TransferLink over the in-memory broker ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Pair:
    """A device and a server link over one InMemoryBroker; the device uploads to the server."""

    def __init__(self, assembler: ChunkAssembler | None = None) -> None:
        self.broker, self.clock = InMemoryBroker(), Clock()
        self.device = TransferLink(self._transport("dev"), clock=self.clock, window=4)
        self.server = TransferLink(self._transport("srv"), clock=self.clock, assembler=assembler)
        self.received: list[bytes] = []
        self.on_device_ack: Callable[[], None] = lambda: None

    def _transport(self, name: str) -> InMemoryTransport:
        transport = InMemoryTransport(self.broker, name)
        transport.subscribe("down" if name == "dev" else "up")
        transport.start()
        return transport

    def reconnect_device(self) -> None:
        self.device.transport.close()
        self.device.transport = self._transport("dev")
        self.device.resume_all()

    def pump(self, _max_wait: float = 0.0) -> None:
        self.clock.t += 0.01
        while (m := self.server.transport.receive(0)) is not None:
            decoded = decode_message(m.payload)
            assert isinstance(decoded, ChunkMessage)
            obj = self.server.handle(decoded, "down")
            self.received += [obj] if obj is not None else []
        while (m := self.device.transport.receive(0)) is not None:
            decoded = decode_message(m.payload)
            assert isinstance(decoded, ChunkAck)
            self.device.handle(decoded, "up")
            self.on_device_ack()


def test_link_uploads_and_resumes_after_a_reconnect() -> None:
    pair, data, cut = Pair(), payload(100 * KIB), list[int]()
    tid = pair.device.send("up", data, device_id="dev-1", round=1, task_id="r1", chunk_size=4 * KIB)
    sender_ = pair.device.sender(tid)

    def cut_once() -> None:
        if sender_.acked >= 10 and not cut:
            cut.append(sender_.acked)
            pair.reconnect_device()

    pair.on_device_ack = cut_once
    assert pair.device.wait(tid, pair.pump, timeout_s=1)
    assert pair.device.state(tid) == "done" and pair.received == [data]
    assert cut and 0 < sender_.resent <= 4
    pair.device.forget(tid)
    with pytest.raises(KeyError):
        pair.device.state(tid)


def test_link_keeps_a_transfer_whose_publish_failed_and_retries_on_poll(caplog: pytest.LogCaptureFixture) -> None:
    pair, data = Pair(), payload(10 * KIB)
    pair.device.transport.close()
    with caplog.at_level(logging.WARNING, "fedflock.transfer"):
        tid = pair.device.send("up", data, device_id="dev-1", round=1, task_id="r1", chunk_size=KIB)
    assert pair.device.state(tid) == "sending" and "will retry" in caplog.text
    pair.device.transport = pair._transport("dev")
    pair.device.poll()
    pair.pump()
    assert pair.received == []  # not before retry_s
    pair.clock.t = 1.0
    assert pair.device.wait(tid, pair.pump, timeout_s=1) and pair.received == [data]
    assert pair.device.sender(tid).resent == 0


def test_link_reports_rejection_and_ignores_unknown_acks(caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair(assembler=ChunkAssembler(max_object_bytes=8 * KIB))
    tid = pair.device.send("up", payload(9 * KIB), device_id="dev-1", round=1, task_id="r1", chunk_size=KIB)
    assert not pair.device.wait(tid, pair.pump, timeout_s=1)
    assert pair.device.state(tid) == "failed: object of 9216 bytes exceeds the limit of 8192 bytes"
    stray = ChunkAck(device_id="dev-1", round=1, task_id="r1", transfer_id="nope", next=1)
    with caplog.at_level(logging.INFO, "fedflock.transfer"):
        assert pair.device.handle(stray, "up") is None
    assert "unknown transfer nope" in caplog.text


def test_link_wait_times_out_and_an_unanswered_transfer_fails_after_max_stalls() -> None:
    clock = Clock()
    link = TransferLink(InMemoryTransport(InMemoryBroker(), "lonely"), clock=clock, ack_timeout_s=1, max_stalls=2)
    link.transport.start()
    tid = link.send("void", payload(2 * KIB), device_id="d", round=1, task_id="t", chunk_size=KIB)

    def tick(_: float) -> None:
        clock.t += 0.3

    assert not link.wait(tid, tick, timeout_s=0.5) and link.state(tid) == "sending"
    assert not link.wait(tid, tick, timeout_s=10) and link.state(tid).startswith("failed: no progress in 2 timeouts")
    assert clock.t < 3
