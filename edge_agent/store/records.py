"""What the device store hands back, and the wording of its log lines.

Every task or result the store removes before it was used is logged on ``fedflock.store``, one
line each, in the words :func:`drop_line` builds, e.g.::

    dropped task r3-7f2a9c0b… (round 3): deadline passed 12 min ago
    dropped result r3-7f2a9c0b… (round 3) after 2 attempts: server closed the round
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "InboxTask",
    "OutboxItem",
    "PurgeReport",
    "StoreSizes",
    "deadline_reason",
    "describe_age",
    "drop_line",
    "short_id",
]

_SHORT_ID_CHARS = 11


@dataclass(frozen=True, kw_only=True)
class InboxTask:
    """A received TASK envelope waiting to be trained on."""

    task_id: str
    round: int
    envelope: bytes
    received_at: float
    expires_at: float


@dataclass(frozen=True, kw_only=True)
class OutboxItem:
    """An encoded UPDATE or ERROR envelope and its delivery bookkeeping.

    ``attempts`` counts the sends begun so far (:meth:`DeviceStore.begin_attempt`);
    ``delivered_at`` is None until the broker acknowledged it.
    """

    task_id: str
    round: int
    envelope: bytes
    created_at: float
    expires_at: float
    attempts: int
    delivered_at: float | None


@dataclass(frozen=True, kw_only=True)
class StoreSizes:
    """Counts for ``fedflock agent status``.

    ``bytes`` is the size of the database file (pages in use and free; the WAL is extra and
    bounded); ``outbox_bytes`` the envelope bytes held in the outbox, which
    ``StoreConfig.max_outbox_bytes`` caps.
    """

    pending_tasks: int
    pending_results: int
    delivered_results: int
    bytes: int
    outbox_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class PurgeReport:
    """What one :meth:`DeviceStore.purge` removed."""

    expired_tasks: int = 0
    expired_results: int = 0
    delivered_results: int = 0
    finished_tasks: int = 0
    participations: int = 0

    @property
    def total(self) -> int:
        return (
            self.expired_tasks
            + self.expired_results
            + self.delivered_results
            + self.finished_tasks
            + self.participations
        )


def short_id(task_id: str) -> str:
    """``task_id`` cut to fit a log line (task ids are long random strings)."""
    return task_id if len(task_id) <= _SHORT_ID_CHARS + 1 else task_id[:_SHORT_ID_CHARS] + "…"


def describe_age(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable: ``45 s``, ``12 min``, ``5 h``, ``3 days``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86_400:.0f} days"


def drop_line(kind: str, task_id: str, round_: int, reason: str, *, attempts: int | None = None) -> str:
    """The log line for a task or result removed before it served its purpose."""
    tried = ""
    if attempts is not None:
        tried = f" after {attempts} attempt{'' if attempts == 1 else 's'}"
    return f"dropped {kind} {short_id(task_id)} (round {round_}){tried}: {reason}"


def deadline_reason(expires_at: float, now: float) -> str:
    """Why an entry past its deadline was dropped: ``deadline passed 12 min ago``."""
    return f"deadline passed {describe_age(now - expires_at)} ago"
