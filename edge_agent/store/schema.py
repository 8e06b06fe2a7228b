"""The device store's schema, its version and the migration hook.

The file identifies itself with ``PRAGMA application_id`` (``FFLS``) and versions its schema with
``PRAGMA user_version``; both live in the database header and change inside the same transaction
as the tables, so a migration that fails half-way leaves the file at its old version.

``MIGRATIONS[v]`` turns schema ``v`` into ``v + 1``; step 0 creates the first schema, so a new
file and an old one take the same path. To change the schema: append a step, bump
:data:`SCHEMA_VERSION`, never edit a released step. A file whose version is newer than this code
knows (an agent downgraded after an upgrade) is refused rather than guessed at.

Schema version 1::

    tasks           the inbox; one row per task id ever received (until purged)
      seq INTEGER PRIMARY KEY     arrival order (the device clock may jump, seq does not)
      task_id TEXT UNIQUE, round INTEGER, envelope BLOB (emptied once done),
      received_at REAL, expires_at REAL, done_at REAL (NULL while pending)
    results         the outbox; one row per task answered
      seq INTEGER PRIMARY KEY     creation order: the send order
      task_id TEXT UNIQUE, round INTEGER, envelope BLOB, size INTEGER,
      created_at REAL, expires_at REAL, attempts INTEGER, last_attempt_at REAL,
      delivered_at REAL (NULL while pending)
    participations  task_id TEXT PRIMARY KEY, at REAL       the budget's history
    facts           key TEXT PRIMARY KEY, value TEXT (JSON), updated_at REAL
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path

from edge_agent.errors import StorageError

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "Migration", "ensure_schema", "schema_version"]

APPLICATION_ID = int.from_bytes(b"FFLS", "big")
SCHEMA_VERSION = 1

Migration = Callable[[sqlite3.Connection], None]

_SCHEMA_V1 = (
    """CREATE TABLE tasks (
        seq         INTEGER PRIMARY KEY,
        task_id     TEXT NOT NULL UNIQUE,
        round       INTEGER NOT NULL,
        envelope    BLOB NOT NULL,
        received_at REAL NOT NULL,
        expires_at  REAL NOT NULL,
        done_at     REAL
    )""",
    """CREATE TABLE results (
        seq             INTEGER PRIMARY KEY,
        task_id         TEXT NOT NULL UNIQUE,
        round           INTEGER NOT NULL,
        envelope        BLOB NOT NULL,
        size            INTEGER NOT NULL,
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_attempt_at REAL,
        delivered_at    REAL
    )""",
    "CREATE INDEX results_by_state ON results (delivered_at, seq)",
    "CREATE TABLE participations (task_id TEXT PRIMARY KEY, at REAL NOT NULL)",
    "CREATE INDEX participations_by_time ON participations (at)",
    "CREATE TABLE facts (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL)",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


MIGRATIONS: Mapping[int, Migration] = {0: _create_v1}


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def ensure_schema(
    conn: sqlite3.Connection,
    path: Path,
    *,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    target: int = SCHEMA_VERSION,
) -> int:
    """Bring the store at ``path`` to schema ``target`` in one transaction; returns the old version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises ``StorageError`` for a
    database that is not a device store, a version newer than ``target`` or a missing step;
    sqlite3 errors propagate for the caller to translate.
    """
    conn.execute("BEGIN IMMEDIATE")  # re-read under the write lock: two processes may open a new file at once
    try:
        version = _check_identity(conn, path, target)
        for step in range(version, target):
            migration = migrations.get(step)
            if migration is None:
                raise StorageError(f"device store {path}: no migration from schema version {step} to {step + 1}")
            migration(conn)
        if version != target:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version


def _check_identity(conn: sqlite3.Connection, path: Path, target: int) -> int:
    """The file's schema version, after making sure it is a device store this code can read."""
    version = schema_version(conn)
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id == 0 and version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchone()[0]
        if tables:
            raise StorageError(f"{path} is an SQLite database but not a fedflock device store; refusing to touch it")
        return 0
    if app_id != APPLICATION_ID:
        raise StorageError(
            f"{path} is an SQLite database with application id {app_id:#x}, not a fedflock device store "
            f"({APPLICATION_ID:#x}); refusing to touch it"
        )
    if version > target:
        raise StorageError(
            f"device store {path} has schema version {version}, newer than this agent understands ({target}); "
            "upgrade the agent, or move the file aside to start with an empty store"
        )
    return version
