"""Chunked, resumable transfers over any :class:`~edge_agent.transport.base.Transport`.

:class:`TransferLink` drives the pure state machines of :mod:`edge_agent.protocol.chunks` on
one transport: :class:`~edge_agent.protocol.chunks.ChunkSender` for objects it sends and one
:class:`~edge_agent.protocol.chunks.ChunkAssembler` for objects it receives. It is
single-threaded and passive: the caller receives and decodes messages from the transport,
hands CHUNK and CHUNK_ACK messages to :meth:`TransferLink.handle`, and calls
:meth:`TransferLink.poll` regularly (timeouts and re-sends happen only there).

Topics are the caller's business. fedflock uses the device topics: an upload's chunks go on the
device's results topic and the server acks on the device's tasks topic; a download is the
reverse. Chunks and acks are published at QoS 1.

A publish that raises :class:`~edge_agent.errors.TransportError` does not fail the transfer:
the sender keeps its state and retries on a later poll (at most once per ``retry_s``), and an
unanswered transfer fails only after ``max_stalls`` acknowledgement timeouts. After replacing a
dead transport (assign :attr:`TransferLink.transport`) or a reconnect, call
:meth:`TransferLink.resume_all` to re-send every transfer from its first unacknowledged chunk.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.errors import TransportError
from edge_agent.protocol.chunks import ChunkAssembler, ChunkSender, new_transfer_id
from edge_agent.protocol.messages import ACK_REJECTED, ChunkAck, ChunkMessage, encode_message
from edge_agent.transport.base import Transport

__all__ = ["TransferLink"]

_log = logging.getLogger("fedflock.transfer")

SENDING, DONE, FAILED = "sending", "done", "failed"


@dataclass(eq=False)
class _Outgoing:
    topic: str
    sender: ChunkSender
    failing: bool = False  # the last publish raised (log once per failure streak)


class TransferLink:
    """Chunked sends and receptions over one transport; not thread-safe (the caller pumps).

    ``window``, ``ack_timeout_s``, ``max_stalls`` and ``retry_s`` configure every
    :class:`ChunkSender`; ``assembler`` receives (default: a :class:`ChunkAssembler` with its
    default limits). ``clock`` is the time source handed to the state machines as ``now``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        assembler: ChunkAssembler | None = None,
        window: int = 8,
        ack_timeout_s: float = 5.0,
        max_stalls: int = 10,
        retry_s: float = 1.0,
        qos: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        #: the transport chunks and acks are published on; replace it after a reconnect
        self.transport = transport
        self.assembler = assembler if assembler is not None else ChunkAssembler()
        self._clock = clock
        self._window, self._ack_timeout_s, self._max_stalls, self._retry_s = window, ack_timeout_s, max_stalls, retry_s
        self._qos = qos
        self._rng = rng
        self._outgoing: dict[str, _Outgoing] = {}

    def send(
        self,
        topic: str,
        data: bytes | bytearray | memoryview,
        *,
        device_id: str,
        round: int,
        task_id: str,
        chunk_size: int,
        transfer_id: str | None = None,
    ) -> str:
        """Start sending ``data`` (one whole envelope) on ``topic``; returns the transfer id.

        The first window is published before returning. ``data`` is referenced, not copied, and
        must not change until the transfer is done or failed.
        """
        transfer_id = transfer_id if transfer_id is not None else new_transfer_id(self._rng)
        if transfer_id in self._outgoing:
            raise ValueError(f"transfer {transfer_id!r} already exists")
        sender = ChunkSender(
            data,
            transfer_id=transfer_id,
            chunk_size=chunk_size,
            device_id=device_id,
            round=round,
            task_id=task_id,
            window=self._window,
            ack_timeout_s=self._ack_timeout_s,
            max_stalls=self._max_stalls,
            retry_s=self._retry_s,
        )
        self._outgoing[transfer_id] = outgoing = _Outgoing(topic, sender)
        _log.debug(
            "transfer %s: sending %d bytes in %d chunks of %d to %s",
            transfer_id,
            sender.total_size,
            sender.count,
            chunk_size,
            topic,
        )
        self._publish_due(transfer_id, outgoing, self._clock())
        return transfer_id

    def handle(self, message: ChunkMessage | ChunkAck, reply_topic: str) -> bytes | None:
        """Process one inbound CHUNK or CHUNK_ACK; returns an object completed by this chunk.

        A chunk goes to the assembler and its ack is published on ``reply_topic``; the object is
        returned once, after its sha256 was verified (``message`` names its device, round and
        task). An ack advances the matching sender, which then publishes whatever became due on
        its own topic (``reply_topic`` is unused); an ack for an unknown transfer, or naming
        another device than the transfer's, is ignored. Checking that a message's ``device_id``
        matches the topic it arrived on is the caller's job (receptions are keyed by it).
        """
        now = self._clock()
        if isinstance(message, ChunkMessage):
            ack, obj = self.assembler.receive(message, now)
            if ack.status == ACK_REJECTED:
                _log.warning("transfer %s from %s rejected: %s", ack.transfer_id, ack.device_id, ack.reason)
            try:
                self.transport.publish(reply_topic, encode_message(ack), qos=self._qos)
            except TransportError as exc:  # the sender times out and re-sends; we ack again then
                _log.warning("transfer %s: cannot publish ack to %s: %s", ack.transfer_id, reply_topic, exc)
            if obj is not None:
                _log.debug("transfer %s: received %d bytes from %s", ack.transfer_id, len(obj), ack.device_id)
            return obj
        outgoing = self._outgoing.get(message.transfer_id)
        if outgoing is None or outgoing.sender.device_id != message.device_id:
            _log.info("ignoring an ack for unknown transfer %s (device %s)", message.transfer_id, message.device_id)
            return None
        sender = outgoing.sender
        sender.on_ack(message, now)
        if sender.failed is not None:
            _log.warning("transfer %s failed: %s", message.transfer_id, sender.failed)
        elif sender.done:
            _log.debug("transfer %s complete (%d chunks re-sent)", message.transfer_id, sender.resent)
        else:
            self._publish_due(message.transfer_id, outgoing, now)
        return None

    def poll(self) -> None:
        """Re-send what timed out or failed to publish; expire idle receptions."""
        now = self._clock()
        for transfer_id, outgoing in list(self._outgoing.items()):
            sender = outgoing.sender
            if sender.done or sender.failed is not None:
                continue
            self._publish_due(transfer_id, outgoing, now)
            if sender.failed is not None:
                _log.warning("transfer %s failed: %s", transfer_id, sender.failed)
        for transfer_id in self.assembler.expire(now):
            _log.info("transfer %s: dropped an incomplete reception (idle too long)", transfer_id)

    def resume_all(self) -> None:
        """After a reconnect: re-send every unfinished transfer from its first unacknowledged chunk."""
        now = self._clock()
        for transfer_id, outgoing in list(self._outgoing.items()):
            outgoing.sender.resume(now)
            self._publish_due(transfer_id, outgoing, now)

    def state(self, transfer_id: str) -> str:
        """``"sending"``, ``"done"`` or ``"failed: <reason>"``; KeyError for an unknown id."""
        sender = self._outgoing[transfer_id].sender
        if sender.failed is not None:
            return f"{FAILED}: {sender.failed}"
        return DONE if sender.done else SENDING

    def sender(self, transfer_id: str) -> ChunkSender:
        """The state machine of an outgoing transfer (progress and ``resent`` for metrics)."""
        return self._outgoing[transfer_id].sender

    def transfers(self) -> list[str]:
        """Ids of the outgoing transfers not yet forgotten."""
        return list(self._outgoing)

    def forget(self, transfer_id: str) -> None:
        """Stop tracking an outgoing transfer (a sending one is abandoned). No-op if unknown."""
        self._outgoing.pop(transfer_id, None)

    def wait(self, transfer_id: str, pump: Callable[[float], None], timeout_s: float) -> bool:
        """Pump until the transfer is done (True) or failed or ``timeout_s`` passed (False).

        ``pump(max_wait_s)`` must receive and :meth:`handle` inbound messages for at most about
        ``max_wait_s`` seconds; :meth:`poll` is called between pumps.
        """
        deadline = self._clock() + timeout_s
        while True:
            sender = self._outgoing[transfer_id].sender
            if sender.done or sender.failed is not None:
                return sender.done
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            pump(min(remaining, 0.05))
            self.poll()

    def _publish_due(self, transfer_id: str, outgoing: _Outgoing, now: float) -> None:
        for chunk in outgoing.sender.due(now):
            try:
                self.transport.publish(outgoing.topic, encode_message(chunk), qos=self._qos)
            except TransportError as exc:
                outgoing.sender.publish_failed(chunk.index, now)
                if not outgoing.failing:
                    _log.warning(
                        "transfer %s: cannot publish chunk %d to %s (%s); will retry",
                        transfer_id,
                        chunk.index,
                        outgoing.topic,
                        exc,
                    )
                outgoing.failing = True
                return
            outgoing.failing = False
