"""Chunked, resumable transfers of one large envelope: pure state machines, no I/O.

An *object* (one whole FFLK envelope) travels as CHUNKs, each answered by a CHUNK_ACK; chunk ``i``
covers bytes ``[i * chunk_size, min((i + 1) * chunk_size, total_size))`` and repeats the object's
metadata (no "begin" message). Acks are cumulative (``next`` = leading chunks held). The receiver
(:class:`ChunkAssembler`) stores strictly in order; the sender (:class:`ChunkSender`) runs go-back-N.
``now`` is any monotonic time; :class:`edge_agent.transfer.TransferLink` drives both on a Transport.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol.header import TOKEN_PATTERN
from edge_agent.protocol.messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ACK_RESEND,
    MIN_CHUNK_BYTES,
    SHA256_PATTERN,
    ChunkAck,
    ChunkMessage,
)
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = ["ChunkAssembler", "ChunkSender", "chunk_problem", "new_transfer_id"]


def new_transfer_id(rng: random.Random | None = None) -> str:
    """``"t"`` + 24 hex digits: 96 bits from ``rng`` (tests) or :mod:`secrets` (unguessable)."""
    bits = rng.getrandbits(96) if rng is not None else secrets.randbits(96)
    return f"t{bits:024x}"


def chunk_problem(chunk: ChunkMessage) -> str | None:
    """Why ``chunk`` is not self-consistent (the rules :func:`decode_message` enforces), or None."""
    if chunk.chunk_size < MIN_CHUNK_BYTES:
        return f"chunk_size {chunk.chunk_size} < {MIN_CHUNK_BYTES}"
    if chunk.total_size < 1 or chunk.count != -(-chunk.total_size // chunk.chunk_size):
        return f"count {chunk.count} does not match total_size {chunk.total_size} / chunk_size {chunk.chunk_size}"
    if not 0 <= chunk.index < chunk.count:
        return f"index {chunk.index} outside 0..{chunk.count - 1}"
    expected = min(chunk.chunk_size, chunk.total_size - chunk.index * chunk.chunk_size)
    if len(chunk.data) != expected:
        return f"chunk {chunk.index} carries {len(chunk.data)} bytes, expected {expected}"
    if not SHA256_PATTERN.match(chunk.sha256):
        return "sha256 is not 64 lowercase hex digits"
    return None


class ChunkSender:
    """Sender side of one transfer: which chunks to (re)send when (go-back-N).

    State: ``acked`` (the receiver's cumulative ``next``), ``next_send`` (next index to emit),
    a progress timer and a stall counter. Rules, in the order they apply:

    1. :meth:`due` (call it often): if ``ack_timeout_s`` passed since the last progress (or since
       the first send, last go-back or :meth:`resume`), count a stall; the ``max_stalls``-th
       stall in a row fails the transfer, otherwise ``next_send = acked`` (go back) and the timer
       restarts. Then emit ``next_send .. min(acked + window, count) - 1``. Once ``acked ==
       count`` (all held but no COMPLETE seen) a go-back re-sends the last chunk, whose ack
       carries the COMPLETE.
    2. :meth:`on_ack`: REJECTED fails with the receiver's reason; COMPLETE finishes. OK with
       ``n = min(ack.next, count)``: ``n > acked`` is progress (``acked = n``, stalls reset,
       timer restarts, ``next_send >= n``). Then, a RESEND ack reports a gap
       (chunk ``n`` is missing: "out of order", or "unknown transfer ...; resend from chunk 0"
       after the receiver lost its state); if ``n < next_send`` it *rewinds*: ``acked =
       next_send = n`` (``acked`` may decrease), timer restarts - unless ``n == acked`` and a
       rewind or go-back to ``n`` already happened since ``acked`` last advanced (the other
       chunks of a window draw the same ack and must not trigger one re-send each). Any other
       ack (a duplicate's, or a stale one) changes nothing: our own re-sends cause duplicates.
    3. :meth:`publish_failed`: the caller could not hand chunk ``index`` (and the rest of the
       last batch) to the transport: ``next_send = index`` and nothing is due for ``retry_s``.
    4. :meth:`resume` (after a reconnect): go back to ``acked`` now, clear the stall counter.

    ``resent`` counts transmissions of chunks that had been sent before. ``data`` is referenced,
    not copied (each chunk copies only its own slice) and must not change until the transfer
    ends; it is released once the transfer is done or failed.
    """

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        transfer_id: str,
        chunk_size: int,
        device_id: str,
        round: int,
        task_id: str,
        window: int = 8,
        ack_timeout_s: float = 5.0,
        max_stalls: int = 10,
        retry_s: float = 1.0,
    ) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            raise ValueError("cannot send an empty object")
        if chunk_size < MIN_CHUNK_BYTES:
            raise ValueError(f"chunk_size {chunk_size} < {MIN_CHUNK_BYTES}")
        if not TOKEN_PATTERN.match(transfer_id) or not DEVICE_ID_PATTERN.match(device_id):
            raise ValueError(f"invalid transfer_id {transfer_id!r} or device_id {device_id!r}")
        if window < 1 or max_stalls < 1 or not ack_timeout_s > 0 or retry_s < 0:
            raise ValueError("need window >= 1, max_stalls >= 1, ack_timeout_s > 0, retry_s >= 0")
        self.transfer_id, self.device_id, self.round, self.task_id = transfer_id, device_id, round, task_id
        self.chunk_size, self.total_size = chunk_size, len(view)
        self.count = math.ceil(self.total_size / chunk_size)
        self.sha256 = hashlib.sha256(view).hexdigest()
        self.window, self.ack_timeout_s, self.max_stalls, self.retry_s = window, ack_timeout_s, max_stalls, retry_s
        self._meta: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("device_id", "round", "task_id", "transfer_id", "count", "chunk_size", "total_size", "sha256")
        }
        self._view: memoryview | None = view
        self._acked = 0
        self._next_send = 0
        self._high = 0  # 1 + highest index ever emitted
        self._mark: int | None = None  # ``acked`` at the last rewind (one rewind per value)
        self._progress_at: float | None = None
        self._paused_until = -math.inf
        self._stalls = 0
        self._batch = (0, 0, 0)  # start, end, _high before the last due() batch
        self._done = False
        self._failed: str | None = None
        self.sent = 0
        self.resent = 0

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> str | None:
        return self._failed

    @property
    def acked(self) -> int:
        return self._acked

    def due(self, now: float) -> list[ChunkMessage]:
        """Chunks to publish now (possibly none), in index order."""
        if self._done or self._failed is not None:
            return []
        if self._progress_at is None:
            self._progress_at = now
        elif now - self._progress_at >= self.ack_timeout_s:
            self._stalls += 1
            if self._stalls >= self.max_stalls:
                self._fail(f"no progress in {self._stalls} timeouts of {self.ack_timeout_s:g}s")
                return []
            self._go_back(now)
        if now < self._paused_until:
            return []
        start, end = self._next_send, min(self._acked + self.window, self.count)
        if start >= end:
            return []
        self._batch = (start, end, self._high)
        self.resent += max(0, min(end, self._high) - start)
        self.sent += end - start
        self._high = max(self._high, end)
        self._next_send = end
        return [self._chunk(i) for i in range(start, end)]

    def on_ack(self, ack: ChunkAck, now: float) -> None:
        """Apply the receiver's acknowledgement (rule 2); ignored once done or failed."""
        if ack.transfer_id != self.transfer_id:
            raise ValueError(f"ack for transfer {ack.transfer_id!r} given to sender of {self.transfer_id!r}")
        if self._done or self._failed is not None:
            return
        if ack.status == ACK_REJECTED:
            self._fail(ack.reason or "rejected by the receiver")
            return
        if ack.status == ACK_COMPLETE:
            self._acked = self.count
            self._done = True
            self._view = None
            return
        n = min(ack.next, self.count)
        if n > self._acked:
            self._acked, self._stalls, self._progress_at, self._mark = n, 0, now, None
            self._next_send = max(self._next_send, n)
        if ack.status == ACK_RESEND and n < self._next_send and not (n == self._acked == self._mark):
            self._acked = self._next_send = self._mark = n
            self._progress_at = now

    def publish_failed(self, index: int, now: float) -> None:
        """Chunk ``index`` of the last :meth:`due` batch, and the rest of that batch, were not sent."""
        start, end, high_before = self._batch
        if not start <= index < end:
            raise ValueError(f"chunk {index} is not in the last batch {start}..{end - 1}")
        self.sent -= end - index
        self.resent -= max(0, min(end, high_before) - index)
        self._high = max(high_before, index)
        self._next_send = min(self._next_send, index)
        self._batch = (start, index, high_before)
        self._paused_until = now + self.retry_s

    def resume(self, now: float) -> None:
        """After a reconnect: re-send from the first unacknowledged chunk on the next :meth:`due`."""
        if self._done or self._failed is not None:
            return
        self._go_back(now)
        self._stalls = 0
        self._mark = None

    def _go_back(self, now: float) -> None:
        self._next_send = min(self._acked, self.count - 1)
        self._mark = self._acked
        self._progress_at = now
        self._paused_until = -math.inf

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._view = None

    def _chunk(self, index: int) -> ChunkMessage:
        assert self._view is not None
        begin = index * self.chunk_size
        return ChunkMessage(**self._meta, index=index, data=bytes(self._view[begin : begin + self.chunk_size]))


_META = ("count", "chunk_size", "total_size", "sha256", "round", "task_id")


@dataclass(eq=False)
class _Reception:
    chunk: ChunkMessage  # the first chunk: the metadata every later chunk must repeat
    last_seen: float
    next: int = 0
    parts: list[bytes] = field(default_factory=list)
    hasher: Any = field(default_factory=hashlib.sha256)


class ChunkAssembler:
    """Receiver side: reassembles any number of concurrent transfers, one ack per chunk.

    A transfer is keyed by ``(device_id, transfer_id)``, so a chunk naming another device's
    transfer id starts a separate transfer and can never disturb that device's (``device_id``
    agreement is thereby implied). :meth:`receive` applies these rules in order; every answer is
    a CHUNK_ACK with ``next`` = chunks held (0 when the transfer is not held):

    1. The chunk is not self-consistent (:func:`chunk_problem`) -> REJECTED, transfer dropped.
    2. The transfer completed recently (an LRU of ``remember_completed`` keys) -> COMPLETE with
       ``next = count`` and no object: a re-sent final chunk is never delivered twice. A different
       ``sha256`` under a completed id -> REJECTED.
    3. Unknown transfer: ``total_size > max_object_bytes`` -> REJECTED (before anything is
       allocated); ``index > 0`` -> RESEND, ``next = 0``, "unknown transfer ...; resend from chunk 0"
       (the receiver restarted or expired it); ``max_transfers`` held in total or
       ``max_transfers_per_device`` for this device -> REJECTED "too many concurrent transfers";
       the declared sizes of held transfers would exceed ``max_pending_bytes`` -> REJECTED.
       Otherwise the transfer is created (empty: buffers grow as chunks arrive).
    4. Known transfer whose ``count``/``chunk_size``/``total_size``/``sha256``/``round``/
       ``task_id`` differ from its first chunk's -> REJECTED, transfer dropped.
    5. ``index < next``: duplicate, OK with ``next``. ``index > next``: not stored, RESEND with
       ``next`` and reason "out of order: got i, expected n" (the sender rewinds).
       ``index == next``: stored, ``next += 1``; after the last chunk the sha256 of the whole
       object is checked: match -> COMPLETE and the object is returned (once), mismatch ->
       REJECTED "sha256 mismatch", dropped. Otherwise OK with the new ``next``.

    :meth:`expire` drops transfers idle for more than ``idle_timeout_s``. ``counters`` (metrics)
    counts rejections (malformed, reused_id, too_large, too_many_transfers, over_budget,
    inconsistent, sha256_mismatch) and events (unknown_transfer, duplicate, out_of_order,
    after_complete, completed, expired).

    Memory: chunks are kept as received and joined once on completion, so a transfer holds at
    most ``total_size`` bytes (twice, briefly, while joining); the worst case is all slots full,
    ``max_transfers * max_object_bytes`` (64 GiB with the defaults!). Bound it with
    ``max_pending_bytes`` (the sum of the *declared* sizes of held transfers, checked before one
    is accepted) or by sizing ``max_object_bytes`` to the largest legitimate object and
    ``max_transfers`` to the expected concurrency (e.g. the cohort of a round).
    """

    def __init__(
        self,
        *,
        max_object_bytes: int = 256 << 20,
        max_transfers: int = 256,
        max_transfers_per_device: int = 4,
        max_pending_bytes: int | None = None,
        idle_timeout_s: float = 600.0,
        remember_completed: int = 4096,
    ) -> None:
        if min(max_object_bytes, max_transfers, max_transfers_per_device, remember_completed) < 1:
            raise ValueError("assembler limits must be >= 1")
        self.max_object_bytes, self.max_transfers = max_object_bytes, max_transfers
        self.max_transfers_per_device, self.max_pending_bytes = max_transfers_per_device, max_pending_bytes
        self.idle_timeout_s, self.remember_completed = idle_timeout_s, remember_completed
        self.counters: Counter[str] = Counter()
        self._transfers: dict[tuple[str, str], _Reception] = {}
        self._per_device: Counter[str] = Counter()
        self._pending_bytes = 0
        self._completed: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()

    @property
    def active(self) -> int:
        """Transfers being received."""
        return len(self._transfers)

    @property
    def held_bytes(self) -> int:
        """Bytes of chunks currently held for incomplete transfers."""
        return sum(len(part) for rec in self._transfers.values() for part in rec.parts)

    def receive(self, chunk: ChunkMessage, now: float) -> tuple[ChunkAck, bytes | None]:
        """The ack to publish for ``chunk`` and, exactly once per transfer, the verified object."""
        key = (chunk.device_id, chunk.transfer_id)
        if (problem := chunk_problem(chunk)) is not None:
            self._drop(key)
            return self._reject(chunk, "malformed", f"malformed chunk: {problem}")
        if (finished := self._completed.get(key)) is not None:
            self._completed.move_to_end(key)
            if finished[0] != chunk.sha256:
                return self._reject(chunk, "reused_id", f"transfer {chunk.transfer_id} already completed")
            self.counters["after_complete"] += 1
            return self._ack(chunk, finished[1], ACK_COMPLETE), None
        rec = self._transfers.get(key)
        if rec is None:
            if (refused := self._refusal(chunk)) is not None:
                return refused, None
            rec = self._transfers[key] = _Reception(chunk, now)
            self._per_device[chunk.device_id] += 1
            self._pending_bytes += chunk.total_size
        else:
            differing = [name for name in _META if getattr(chunk, name) != getattr(rec.chunk, name)]
            if differing:
                self._drop(key)
                return self._reject(chunk, "inconsistent", f"inconsistent chunk metadata: {', '.join(differing)}")
        rec.last_seen = now
        if chunk.index < rec.next:
            self.counters["duplicate"] += 1
            return self._ack(chunk, rec.next), None
        if chunk.index > rec.next:
            self.counters["out_of_order"] += 1
            return self._ack(
                chunk, rec.next, ACK_RESEND, reason=f"out of order: got {chunk.index}, expected {rec.next}"
            ), None
        rec.parts.append(chunk.data)
        rec.hasher.update(chunk.data)
        rec.next += 1
        if rec.next < chunk.count:
            return self._ack(chunk, rec.next), None
        self._drop(key)
        if rec.hasher.hexdigest() != chunk.sha256:
            return self._reject(chunk, "sha256_mismatch", "sha256 mismatch")
        self._completed[key] = (chunk.sha256, chunk.count)
        while len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)
        self.counters["completed"] += 1
        return self._ack(chunk, chunk.count, ACK_COMPLETE), b"".join(rec.parts)

    def expire(self, now: float) -> list[str]:
        """Drop transfers idle for more than ``idle_timeout_s``; returns their transfer ids."""
        stale = [key for key, rec in self._transfers.items() if now - rec.last_seen > self.idle_timeout_s]
        for key in stale:
            self._drop(key)
            self.counters["expired"] += 1
        return [transfer_id for _, transfer_id in stale]

    def _refusal(self, chunk: ChunkMessage) -> ChunkAck | None:
        """Rule 3: why a chunk of an unknown transfer does not start one (None: start it)."""
        if chunk.total_size > self.max_object_bytes:
            reason = f"object of {chunk.total_size} bytes exceeds the limit of {self.max_object_bytes} bytes"
            return self._reject(chunk, "too_large", reason)[0]
        if chunk.index > 0:
            self.counters["unknown_transfer"] += 1
            return self._ack(chunk, 0, ACK_RESEND, reason=f"unknown transfer {chunk.transfer_id}; resend from chunk 0")
        if (
            len(self._transfers) >= self.max_transfers
            or self._per_device[chunk.device_id] >= self.max_transfers_per_device
        ):
            return self._reject(chunk, "too_many_transfers", "too many concurrent transfers")[0]
        budget = self.max_pending_bytes
        if budget is not None and self._pending_bytes + chunk.total_size > budget:
            return self._reject(chunk, "over_budget", f"receiver buffer budget of {budget} bytes exhausted")[0]
        return None

    def _drop(self, key: tuple[str, str]) -> None:
        rec = self._transfers.pop(key, None)
        if rec is None:
            return
        self._pending_bytes -= rec.chunk.total_size
        self._per_device[key[0]] -= 1
        if not self._per_device[key[0]]:
            del self._per_device[key[0]]

    def _reject(self, chunk: ChunkMessage, kind: str, reason: str) -> tuple[ChunkAck, None]:
        self.counters[kind] += 1
        return self._ack(chunk, 0, ACK_REJECTED, reason), None

    @staticmethod
    def _ack(chunk: ChunkMessage, next_: int, status: str = ACK_OK, reason: str = "") -> ChunkAck:
        ids: dict[str, Any] = {"device_id": chunk.device_id, "round": chunk.round, "task_id": chunk.task_id}
        return ChunkAck(**ids, transfer_id=chunk.transfer_id, next=next_, status=status, reason=reason)
