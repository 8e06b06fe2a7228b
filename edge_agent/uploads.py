"""Store-and-forward uploads: results leave the device's outbox when the device may upload.

A result is committed to the on-disk outbox (:class:`edge_agent.store.DeviceStore`) before the
agent considers its task finished; :class:`Uploader` sends the oldest one when the eligibility
gate allows the ``upload`` phase and marks it delivered once the broker acknowledged it (PUBACK,
or the server's ``complete`` for a chunked upload). Every send is a new *attempt*: the UPDATE is
re-encoded with the attempt number the store hands out, so the idempotency key
``(device, task, attempt)`` changes while the server still accepts at most one update per
``(device, task)`` (docs/protocol.md §6). A failed send backs off exponentially with jitter.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable

from edge_agent.errors import TransportError
from edge_agent.protocol.messages import UpdateMessage, decode_message, encode_message
from edge_agent.store import DeviceStore, OutboxItem

log = logging.getLogger("fedflock.agent")

#: Send one envelope: ``(envelope, round, task_id) -> "done" | "failed: <reason>" | "rejected: <reason>"``.
SendEnvelope = Callable[[bytes, int, str], str]


def with_attempt(envelope: bytes, attempt: int) -> bytes:
    """``envelope`` with its UPDATE ``attempt`` set (ERROR envelopes have none and pass through)."""
    message = decode_message(envelope)
    if isinstance(message, UpdateMessage) and message.attempt != attempt:
        return encode_message(dataclasses.replace(message, attempt=attempt))
    return envelope


class Uploader:
    """Sends outbox items one at a time, with jittered exponential backoff after failures."""

    def __init__(
        self,
        store: DeviceStore,
        send: SendEnvelope,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        self._store = store
        self._send = send
        self._clock = clock
        self._rng = rng
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._failures = 0
        self._not_before = 0.0

    def next_item(self, now: float) -> OutboxItem | None:
        """The result to send now, or None (nothing pending, or backing off after a failure)."""
        if self._clock() < self._not_before:
            return None
        return self._store.next_to_send(now)

    def send(self, item: OutboxItem) -> bool:
        """One attempt at ``item``; True when it was delivered (or refused for good and dropped)."""
        attempt = self._store.begin_attempt(item.task_id)
        try:
            outcome = self._send(with_attempt(item.envelope, attempt), item.round, item.task_id)
        except TransportError as exc:
            outcome = f"failed: {exc.reason}"
        if outcome == "done":
            self._store.mark_delivered(item.task_id)
            self._failures = 0
            log.info("delivered result of task %s (attempt %d)", item.task_id, attempt)
            return True
        if outcome.startswith("rejected"):
            self._store.drop_result(item.task_id, f"server refused it ({outcome})")
            return True
        self._back_off(item, attempt, outcome)
        return False

    def _back_off(self, item: OutboxItem, attempt: int, outcome: str) -> None:
        self._failures += 1
        delay = min(self._max_backoff_s, self._min_backoff_s * 2 ** (self._failures - 1))
        delay *= 1.0 + self._rng.random()  # spread a fleet's retries after a broker outage
        self._not_before = self._clock() + delay
        log.warning(
            "result of task %s not delivered (attempt %d: %s); retrying in %.0fs", item.task_id, attempt, outcome, delay
        )
