"""SQL of the participation history and the facts table; called inside :class:`DeviceStore` transactions."""

from __future__ import annotations

import sqlite3

__all__ = ["get_fact", "insert_participation", "participations_since", "purge_participations", "upsert_fact"]


def insert_participation(conn: sqlite3.Connection, task_id: str, at: float) -> bool:
    """Record a participation; False if ``task_id`` was recorded already (a restart mid-task)."""
    cursor = conn.execute(
        "INSERT INTO participations (task_id, at) VALUES (?, ?) ON CONFLICT (task_id) DO NOTHING", (task_id, at)
    )
    return cursor.rowcount == 1


def participations_since(conn: sqlite3.Connection, since: float) -> list[float]:
    rows = conn.execute("SELECT at FROM participations WHERE at >= ? ORDER BY at", (since,)).fetchall()
    return [float(row[0]) for row in rows]


def purge_participations(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute("DELETE FROM participations WHERE at < ?", (before,)).rowcount


def upsert_fact(conn: sqlite3.Connection, key: str, json_text: str, at: float) -> None:
    conn.execute(
        "INSERT INTO facts (key, value, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (key, json_text, at),
    )


def get_fact(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM facts WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])
