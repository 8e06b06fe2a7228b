"""SQL of the outbox (``results`` table); called by :class:`DeviceStore` inside its transactions.

Functions that remove results return the log lines to emit, and the store logs them only once
the transaction committed: a rolled-back eviction must not be reported as done.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from edge_agent.store.records import OutboxItem, deadline_reason, drop_line

__all__ = [
    "deliver",
    "evict_for",
    "expire_results",
    "get_result",
    "has_result",
    "insert_result",
    "next_attempt",
    "oldest_pending",
    "outbox_bytes",
    "purge_delivered",
    "remove_result",
    "requeue",
]

_COLUMNS = "task_id, round, envelope, created_at, expires_at, attempts, delivered_at"
_EVICTED = "evicted to keep the outbox under max_outbox_bytes"


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        task_id=row[0],
        round=row[1],
        envelope=bytes(row[2]),
        created_at=row[3],
        expires_at=row[4],
        attempts=row[5],
        delivered_at=row[6],
    )


def insert_result(
    conn: sqlite3.Connection, *, task_id: str, round_: int, envelope: bytes, created_at: float, expires_at: float
) -> bool:
    """Store a result; False (and nothing changed) if the task already has one."""
    cursor = conn.execute(
        "INSERT INTO results (task_id, round, envelope, size, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (task_id) DO NOTHING",
        (task_id, round_, envelope, len(envelope), created_at, expires_at),
    )
    return cursor.rowcount == 1


def outbox_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(size), 0) FROM results").fetchone()[0])


def evict_for(conn: sqlite3.Connection, size: int, cap: int, now: float) -> list[str]:
    """Delete results until ``size`` more bytes fit under ``cap``; the log lines of those deleted.

    Least useful first: delivered results and pending ones past their deadline (the broker
    would refuse them), then live pending results, oldest first.
    """
    excess = outbox_bytes(conn) + size - cap
    if excess <= 0:
        return []
    rows = conn.execute(
        "SELECT seq, task_id, round, size, attempts, delivered_at IS NOT NULL FROM results"
        " ORDER BY (delivered_at IS NULL AND expires_at > ?), seq",
        (now,),
    ).fetchall()
    lines = []
    for seq, task_id, round_, row_size, attempts, delivered in rows:
        if excess <= 0:
            break
        conn.execute("DELETE FROM results WHERE seq = ?", (seq,))
        excess -= row_size
        kind = "delivered result" if delivered else "result"
        lines.append(drop_line(kind, task_id, round_, _EVICTED, attempts=attempts))
    return lines


def oldest_pending(conn: sqlite3.Connection, now: float) -> OutboxItem | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM results WHERE delivered_at IS NULL AND expires_at > ? ORDER BY seq LIMIT 1", (now,)
    ).fetchone()
    return None if row is None else _item(row)


def has_result(conn: sqlite3.Connection, task_id: str) -> bool:
    return conn.execute("SELECT 1 FROM results WHERE task_id = ?", (task_id,)).fetchone() is not None


def get_result(conn: sqlite3.Connection, task_id: str) -> OutboxItem | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM results WHERE task_id = ?", (task_id,)).fetchone()
    return None if row is None else _item(row)


def next_attempt(conn: sqlite3.Connection, task_id: str, at: float) -> int | None:
    """Count one more send of ``task_id``'s result; the new count, None if there is no result."""
    row = conn.execute(
        "UPDATE results SET attempts = attempts + 1, last_attempt_at = ? WHERE task_id = ? RETURNING attempts",
        (at, task_id),
    ).fetchone()
    return None if row is None else int(row[0])


def deliver(conn: sqlite3.Connection, task_id: str, at: float) -> bool:
    """Mark a pending result delivered; False if it is unknown or was delivered already."""
    cursor = conn.execute(
        "UPDATE results SET delivered_at = ? WHERE task_id = ? AND delivered_at IS NULL", (at, task_id)
    )
    return cursor.rowcount == 1


def requeue(conn: sqlite3.Connection, task_id: str) -> bool:
    """Make a delivered result pending again; False if it is unknown or still pending."""
    cursor = conn.execute(
        "UPDATE results SET delivered_at = NULL WHERE task_id = ? AND delivered_at IS NOT NULL", (task_id,)
    )
    return cursor.rowcount == 1


def remove_result(conn: sqlite3.Connection, task_id: str, reason: str) -> str | None:
    """Delete ``task_id``'s result; its log line, None if there was none."""
    row = conn.execute(
        "DELETE FROM results WHERE task_id = ? RETURNING round, attempts, delivered_at IS NOT NULL", (task_id,)
    ).fetchone()
    if row is None:
        return None
    kind = "delivered result" if row[2] else "result"
    return drop_line(kind, task_id, row[0], reason, attempts=row[1])


def expire_results(conn: sqlite3.Connection, now: float) -> list[str]:
    """Delete pending results past their deadline; one log line each."""
    rows = conn.execute(
        "DELETE FROM results WHERE delivered_at IS NULL AND expires_at <= ?"
        " RETURNING task_id, round, attempts, expires_at",
        (now,),
    ).fetchall()
    rows.sort(key=lambda row: row[3])
    return [drop_line("result", row[0], row[1], deadline_reason(row[3], now), attempts=row[2]) for row in rows]


def purge_delivered(conn: sqlite3.Connection, before: float) -> int:
    """Forget results delivered before ``before``: their retention is over, nothing is lost."""
    return conn.execute("DELETE FROM results WHERE delivered_at IS NOT NULL AND delivered_at < ?", (before,)).rowcount
