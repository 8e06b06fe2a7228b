"""SQL of the inbox (``tasks`` table); called by :class:`DeviceStore` inside its transactions.

A finished task keeps its row, envelope emptied, until ``retention_s`` after it finished: the
broker re-delivers QoS 1 messages it has no PUBACK for, and the row is how :func:`insert_task`
recognises the re-delivery of a task already trained on.
"""

from __future__ import annotations

import sqlite3

from edge_agent.store.outbox import has_result
from edge_agent.store.records import InboxTask, deadline_reason, drop_line

__all__ = ["expire_tasks", "finish_task", "insert_task", "pending_tasks", "purge_finished_tasks"]


def insert_task(
    conn: sqlite3.Connection, *, task_id: str, round_: int, envelope: bytes, received_at: float, expires_at: float
) -> bool:
    """Store a task; False if ``task_id`` is already known to the inbox or the outbox."""
    if has_result(conn, task_id):
        return False
    cursor = conn.execute(
        "INSERT INTO tasks (task_id, round, envelope, received_at, expires_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (task_id) DO NOTHING",
        (task_id, round_, envelope, received_at, expires_at),
    )
    return cursor.rowcount == 1


def pending_tasks(conn: sqlite3.Connection, now: float) -> list[InboxTask]:
    """Unfinished tasks whose deadline has not passed, in arrival order."""
    rows = conn.execute(
        "SELECT task_id, round, envelope, received_at, expires_at FROM tasks"
        " WHERE done_at IS NULL AND expires_at > ? ORDER BY seq",
        (now,),
    ).fetchall()
    return [
        InboxTask(task_id=row[0], round=row[1], envelope=bytes(row[2]), received_at=row[3], expires_at=row[4])
        for row in rows
    ]


def finish_task(conn: sqlite3.Connection, task_id: str, at: float) -> bool:
    """Mark a pending task finished and free its envelope; False if it is unknown or already finished."""
    cursor = conn.execute(
        "UPDATE tasks SET done_at = ?, envelope = x'' WHERE task_id = ? AND done_at IS NULL", (at, task_id)
    )
    return cursor.rowcount == 1


def expire_tasks(conn: sqlite3.Connection, now: float) -> list[str]:
    """Delete unfinished tasks past their deadline; one log line each."""
    rows = conn.execute(
        "DELETE FROM tasks WHERE done_at IS NULL AND expires_at <= ? RETURNING task_id, round, expires_at", (now,)
    ).fetchall()
    rows.sort(key=lambda row: row[2])
    return [drop_line("task", row[0], row[1], deadline_reason(row[2], now)) for row in rows]


def purge_finished_tasks(conn: sqlite3.Connection, before: float) -> int:
    """Forget tasks finished before ``before`` (a re-delivery after that would be trained again)."""
    return conn.execute("DELETE FROM tasks WHERE done_at IS NOT NULL AND done_at < ?", (before,)).rowcount
