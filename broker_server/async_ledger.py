"""What asynchronous aggregation stores to survive a restart: pure data, its JSON form, task-table rules.

An :class:`AsyncLedger` is the FedBuff state the server store does not hold in its round records:
the open buffer (:class:`~broker_server.fedbuff.BufferCheckpoint`: weighted sums, weight, the
contributing tasks, metrics) and the task table (every TASK issued and not yet answered, with
its device, model version, wall-clock deadline, nonce and base digest: update binding, so a
restarted server still refuses a replayed or cross-device update; a ledger written before
binding has no nonces and its tasks take their updates unbound). The server writes the whole ledger as one
store setting in one transaction after every change (a TASK issued, an update accepted, a
task failed or timed out, a buffer sealed), so the buffer and the task table always agree: an
accepted task is in the buffer and no longer in the table, in one write.

The ledger's ``buffer.base_version`` tells, on restart, whether the buffer was already turned
into a model version: older than the store's latest version means it was (the version row and
the ledger are separate writes), and it is dropped; equal means it is refolded (and sealed at
once if full). Sums travel as base64 of :func:`~edge_agent.protocol.tensors.encode_tensors`
(float64, exact); nothing is pickled.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker_server.fedbuff import BufferCheckpoint, Contribution
from broker_server.update_binding import IssuedTask
from edge_agent.errors import ProtocolError, StorageError
from edge_agent.protocol.binding import TaskBinding, new_nonce
from edge_agent.protocol.tensors import decode_tensors, encode_tensors

__all__ = ["ASYNC_SETTING", "LATE_SETTING", "AsyncLedger", "TaskEntry", "empty_buffer", "expire_tasks", "issue_tasks"]

log = logging.getLogger("fedflock.server")

#: the store setting of the asynchronous engine's ledger
ASYNC_SETTING = "fedbuff"
#: the store setting of a sync server's pending late updates (``late_updates = "async"``)
LATE_SETTING = "late_updates"


@dataclass(frozen=True, kw_only=True)
class TaskEntry:
    """One asynchronous TASK as issued."""

    device_id: str
    model_version: int
    #: the round (buffer) number the TASK carried
    round: int
    #: wall clock: after this the device's slot is reused (its update is still accepted if fresh enough)
    deadline: float
    #: True once the deadline passed (the device may get another task)
    expired: bool = False
    #: the TASK's nonce and the digest of its weights payload ("": stored by a server without binding)
    nonce: str = ""
    base_digest: str = ""

    def issued(self) -> IssuedTask:
        """The task as FedBuff's task table shows it (the binding its update must echo)."""
        return IssuedTask(
            device_id=self.device_id,
            model_version=self.model_version,
            round=self.round,
            binding=TaskBinding(self.nonce, self.base_digest),
        )


def issue_tasks(
    chosen: Iterable[str],
    *,
    round_: int,
    model_version: int,
    deadline: float,
    base_digest: str,
    nonce: Callable[[], str] = new_nonce,
) -> dict[str, TaskEntry]:
    """One new task entry per chosen device: a fresh id and nonce, all sent the payload ``base_digest``."""
    return {
        f"a{round_}-{uuid.uuid4().hex[:12]}": TaskEntry(
            device_id=device_id,
            model_version=model_version,
            round=round_,
            deadline=deadline,
            nonce=nonce(),
            base_digest=base_digest,
        )
        for device_id in chosen
    }


@dataclass(frozen=True, kw_only=True)
class AsyncLedger:
    buffer: BufferCheckpoint
    tasks: Mapping[str, TaskEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        buffer = self.buffer
        return {
            "base_version": buffer.base_version,
            "sums": base64.b64encode(encode_tensors(buffer.sums)).decode("ascii") if buffer.sums else "",
            "total_weight": buffer.total_weight,
            "metric_sums": dict(buffer.metric_sums),
            "num_examples": buffer.num_examples,
            "contributors": [
                [c.device_id, c.task_id, c.model_version, c.staleness, c.num_examples, c.weight]
                for c in buffer.contributors
            ],
            "tasks": {
                task_id: [t.device_id, t.model_version, t.round, t.deadline, t.expired, t.nonce, t.base_digest]
                for task_id, t in self.tasks.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AsyncLedger:
        """The ledger as stored (``StorageError`` naming what is wrong with it)."""
        try:
            sums = decode_tensors(base64.b64decode(data["sums"], validate=True)) if data["sums"] else {}
            contributors = tuple(
                Contribution(
                    device_id=str(d),
                    task_id=str(t),
                    model_version=int(v),
                    staleness=int(s),
                    num_examples=int(n),
                    weight=float(w),
                )
                for d, t, v, s, n, w in data["contributors"]
            )
            buffer = BufferCheckpoint(
                base_version=int(data["base_version"]),
                sums=sums,
                total_weight=float(data["total_weight"]),
                contributors=contributors,
                metric_sums={str(k): float(v) for k, v in data["metric_sums"].items()},
                num_examples=int(data["num_examples"]),
            )
            tasks = {str(task_id): _task_entry(entry) for task_id, entry in data["tasks"].items()}
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            raise StorageError(f"the stored asynchronous ledger is unusable: {exc}") from exc
        if contributors and not sums:
            raise StorageError("the stored asynchronous ledger lists contributions without their sums")
        return cls(buffer=buffer, tasks=tasks)


def expire_tasks(tasks: dict[str, TaskEntry], *, now: float, oldest: int, forget_below: int) -> bool:
    """Mark tasks past their deadline or based on a version older than ``oldest`` expired (their
    slots are reused) and forget those based below ``forget_below`` (long refused as stale: a
    replay of one is an unknown task); True if ``tasks`` changed."""
    changed = False
    for task_id, entry in list(tasks.items()):
        if entry.model_version < forget_below:
            del tasks[task_id]
            changed = True
        elif not entry.expired and (entry.deadline <= now or entry.model_version < oldest):
            log.info("task %s of %s timed out or went stale; its slot is reused", task_id, entry.device_id)
            tasks[task_id] = dataclasses.replace(entry, expired=True)
            changed = True
    return changed


def _task_entry(stored: list[Any]) -> TaskEntry:
    """A stored task: 7 fields, or the first 5 of them from a ledger written before binding."""
    if len(stored) not in (5, 7):
        raise ValueError(f"a stored task has {len(stored)} fields")
    d, v, r, at, x = stored[:5]
    nonce, base = (str(stored[5]), str(stored[6])) if len(stored) == 7 else ("", "")
    entry = TaskEntry(device_id=str(d), model_version=int(v), round=int(r), deadline=float(at), expired=bool(x))
    return dataclasses.replace(entry, nonce=nonce, base_digest=base)


def empty_buffer(base_version: int) -> BufferCheckpoint:
    return BufferCheckpoint(
        base_version=base_version, sums={}, total_weight=0.0, contributors=(), metric_sums={}, num_examples=0
    )
