"""What only the SQLite backend has: pragmas, file identity, locking, the URL factory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from broker_server.persistence import (
    SqliteServerStore,
    StorageError,
    StoreUnavailable,
    open_server_store,
)
from edge_agent.errors import ConfigError


def test_pragmas_are_wal_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    with SqliteServerStore(tmp_path / "s.db") as store:
        store.put_setting("x", 1)
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
        assert (tmp_path / "s.db-wal").exists()


def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()
    with pytest.raises(StorageError, match="not a fedflock server store"):
        SqliteServerStore.open(path)
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    conn.close()
    assert tables == {"photos"}


def test_a_file_that_is_not_sqlite_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(StorageError, match="not an SQLite database") as info:
        SqliteServerStore.open(path)
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SqliteServerStore.open(tmp_path / "nope" / "s.db")
    with pytest.raises(ConfigError):
        SqliteServerStore(tmp_path / "s.db", busy_timeout_s=-1)


def test_a_held_write_lock_is_store_unavailable_then_clears(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteServerStore.open(path, busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.put_setting("x", 1)
        assert store.get_setting("x") is None  # WAL: readers are not blocked by the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.put_setting("x", 2)
    assert store.get_setting("x") == 2
    store.close()


def test_open_server_store_picks_sqlite_for_paths_and_sqlite_urls(tmp_path: Path) -> None:
    first = open_server_store(f"sqlite://{tmp_path / 'a.db'}")
    second = open_server_store(str(tmp_path / "b.db"))
    try:
        assert isinstance(first, SqliteServerStore) and first.path == tmp_path / "a.db"
        assert isinstance(second, SqliteServerStore) and second.path == tmp_path / "b.db"
    finally:
        first.close()
        second.close()


def test_start_twice_is_refused(tmp_path: Path) -> None:
    store = SqliteServerStore.open(tmp_path / "s.db")
    with pytest.raises(StorageError, match="already open"):
        store.start()
    store.close()
