"""Opening the SQLite file, its pragmas, and the translation of sqlite3 errors.

Pragmas, and why:

* ``journal_mode=WAL``: a writer does not block readers (``fedflock agent status`` can read while
  the agent writes) and a commit appends to one file instead of rewriting pages in place, which
  is kinder to SD cards. If the filesystem cannot do WAL, SQLite keeps its rollback journal; that
  is logged, not fatal, as durability is the same.
* ``synchronous=FULL`` on every commit: in WAL mode ``NORMAL`` survives a crash of the agent but
  may lose the last commits on power loss, and pulling the plug is how many edge devices are
  switched off. An outbox commit must survive that: the agent treats a task as finished once
  its result is committed, so a lost commit is a lost round. The store writes a handful of
  times per round, so an fsync per commit costs nothing measurable; a mixed policy (FULL for
  the outbox, NORMAL elsewhere) would only make durability depend on which method wrote last.
* ``busy_timeout``: another process holding the lock makes a write wait instead of failing.
* ``auto_vacuum=INCREMENTAL`` (fixed when the file is created) so :meth:`DeviceStore.purge` can
  hand freed pages back to the filesystem; ``journal_size_limit`` truncates the WAL after a
  checkpoint. Without them a burst of large results would keep the files at their peak size.
* ``max_page_count`` from ``StoreConfig.max_db_bytes``.

sqlite3 errors become :class:`StorageFull` (SQLITE_FULL), :class:`StoreCorrupt` (SQLITE_CORRUPT,
SQLITE_NOTADB, a failed ``quick_check``) or plain ``StorageError``; every message names the file.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.errors import ConfigError, StorageError, StorageFull
from edge_agent.store.config import StoreConfig
from edge_agent.store.schema import ensure_schema

__all__ = ["StorageFull", "StoreCorrupt", "connect", "move_aside", "translate"]

logger = logging.getLogger("fedflock.store")

_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
_SQLITE_HEADER = b"SQLite format 3\x00"

# primary result codes (https://www.sqlite.org/rescode.html)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 5, 6, 11, 13, 26
_CORRUPT_CODES = (_SQLITE_CORRUPT, _SQLITE_NOTADB)
_MESSAGE_CODES = {  # for sqlite3 builds that do not set sqlite_errorcode
    "database or disk is full": _SQLITE_FULL,
    "database disk image is malformed": _SQLITE_CORRUPT,
    "file is not a database": _SQLITE_NOTADB,
    "database is locked": _SQLITE_BUSY,
}


class StoreCorrupt(StorageError):
    """The database file is damaged or not a database at all."""

    code = "storage_corrupt"


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    return _MESSAGE_CODES.get(str(exc))


def translate(exc: sqlite3.Error, path: Path, action: str) -> StorageError:
    """The fedflock error for ``exc``, raised while trying to ``action`` (``"store the result"``)."""
    code = _primary_code(exc)
    if code == _SQLITE_FULL:
        return StorageFull(f"device storage full: could not {action} in {path} ({exc})")
    if code in _CORRUPT_CODES:
        return StoreCorrupt(f"device store {path} is corrupt: could not {action} ({exc})")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageError(f"device store {path} is locked by another process: could not {action} ({exc})")
    return StorageError(f"device store {path}: could not {action} ({exc})")


def connect(path: Path, config: StoreConfig) -> sqlite3.Connection:
    """An open, configured connection to the store at ``path`` with its schema up to date.

    The connection is in autocommit mode (the store issues BEGIN/COMMIT itself) and may be used
    from any thread, serialised by the caller's lock.
    """
    if not path.parent.is_dir():
        raise ConfigError(f"device store {path}: directory {path.parent} does not exist")
    _check_header(path)
    try:
        conn = sqlite3.connect(path, timeout=config.busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise translate(exc, path, "open the database") from exc
    try:
        _configure(conn, path, config)
        ensure_schema(conn, path)
        if config.check_on_open:
            check(conn, path, "quick_check")
    except sqlite3.Error as exc:
        conn.close()
        raise translate(exc, path, "open the database") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite touches it.

    Opening and closing a connection to such a file makes SQLite delete its ``-wal`` file, which
    would destroy what ``move-aside`` is meant to keep.
    """
    try:
        with path.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"device store {path}: could not read the file ({exc})") from exc
    if header and header != _SQLITE_HEADER:
        raise StoreCorrupt(f"device store {path} is corrupt: not an SQLite database (starts with {header[:8]!r})")


def _configure(conn: sqlite3.Connection, path: Path, config: StoreConfig) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_s * 1000)}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new, empty file: before WAL
    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
    if mode != "wal" and str(path) != ":memory:":
        logger.warning("device store %s: the filesystem does not support WAL; using journal mode %s", path, mode)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
    if config.max_db_bytes:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA max_page_count = {max(1, config.max_db_bytes // page_size)}")


def check(conn: sqlite3.Connection, path: Path, pragma: str = "integrity_check") -> None:
    """Run ``quick_check`` or ``integrity_check``; raises :class:`StoreCorrupt` unless it says ok."""
    rows = [str(row[0]) for row in conn.execute(f"PRAGMA {pragma}").fetchall()]
    if rows != ["ok"]:
        problems = "; ".join(rows[:5]) + (f"; and {len(rows) - 5} more" if len(rows) > 5 else "")
        raise StoreCorrupt(f"device store {path} is corrupt: {pragma} found {problems}")


def move_aside(path: Path, clock: Callable[[], float]) -> Path:
    """Rename the store at ``path`` (and its -wal/-shm files) to ``<path>.corrupt-<UTC time>``.

    The WAL goes too: replayed into a fresh database it could resurrect pages of the old one.
    Returns the new name of the main file; an earlier corrupt file is never overwritten.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    try:
        path.rename(target)
        for suffix in ("-wal", "-shm"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                companion.rename(target.with_name(target.name + suffix))
    except OSError as exc:
        raise StorageError(f"device store {path} is corrupt and could not be moved aside: {exc}") from exc
    return target
