"""The default server store: one SQLite file.

Pragmas, and why (the same reasoning as the device store, :mod:`edge_agent.store.connection`):

* ``journal_mode=WAL``: readers (``fedflock`` status commands, a dashboard) never block the
  round loop's writes, and a commit appends to the WAL instead of rewriting pages.
* ``synchronous=FULL``: in WAL mode ``NORMAL`` may lose the last commits on power loss, and a
  lost acceptance commit is an update the device believes delivered. A round writes once per
  update, so an fsync per commit is cheap next to decoding the update.
* ``busy_timeout``: a second process (or store object) holding the write lock makes a write
  wait instead of failing at once.
* ``foreign_keys=ON``: SQLite ignores ``REFERENCES`` without it.

Writes begin with ``BEGIN IMMEDIATE`` (the write lock is taken up front, so two writers never
deadlock upgrading read locks); reads use a deferred ``BEGIN``, which in WAL mode is a
consistent snapshot.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, ClassVar

from broker_server.persistence.errors import StorageError, StoreConflict, StoreUnavailable
from broker_server.persistence.schema import Cursor, Dialect
from broker_server.persistence.sql import Clock, SqlServerStore
from edge_agent.errors import ConfigError

__all__ = ["SQLITE", "SqliteServerStore"]

logger = logging.getLogger("fedflock.server.store")

SQLITE = Dialect(
    name="sqlite",
    blob="BLOB",
    real="REAL",
    for_update="",
    list_tables="SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    migration_lock="",
    exclusive=True,
)

# primary result codes (https://www.sqlite.org/rescode.html)
_BUSY, _LOCKED, _CORRUPT, _FULL, _NOTADB = 5, 6, 11, 13, 26


class SqliteServerStore(SqlServerStore):
    """The server store in the SQLite file at ``path`` (created if missing)."""

    dialect: ClassVar[Dialect] = SQLITE
    _begin_write: ClassVar[str] = "BEGIN IMMEDIATE"
    _driver_errors: ClassVar[tuple[type[Exception], ...]] = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0, clock: Clock = time.time) -> None:
        if not busy_timeout_s >= 0:
            raise ConfigError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        super().__init__(clock=clock)
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s

    @classmethod
    def open(cls, path: str | Path, *, busy_timeout_s: float = 10.0, clock: Clock = time.time) -> SqliteServerStore:
        """Construct and :meth:`start` (connect, create or migrate)."""
        store = cls(path, busy_timeout_s=busy_timeout_s, clock=clock)
        store.start()
        return store

    @property
    def path(self) -> Path:
        return self._path

    @property
    def where(self) -> str:
        return str(self._path)

    def _connect(self) -> sqlite3.Connection:
        if str(self._path) != ":memory:" and not self._path.parent.is_dir():
            raise ConfigError(f"server store {self._path}: directory {self._path.parent} does not exist")
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal" and str(self._path) != ":memory:":
                logger.warning("server store %s: no WAL on this filesystem; journal mode %s", self._path, mode)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _disconnect(self, conn: Any) -> None:
        conn.close()

    def _execute(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Cursor:
        cursor: sqlite3.Cursor = conn.execute(sql, params)
        return cursor

    def _translate(self, exc: Exception, action: str) -> StorageError:
        message = f"server store {self._path}: could not {action} ({exc})"
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreConflict(message)
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (_BUSY, _LOCKED) or "database is locked" in str(exc):
            return StoreUnavailable(f"{message}: locked by another writer for more than {self._busy_timeout_s}s")
        if primary == _FULL:
            return StorageError(f"{message}: disk full")
        if primary in (_CORRUPT, _NOTADB):
            return StorageError(f"{message}: the file is corrupt or not an SQLite database")
        return StorageError(message)
