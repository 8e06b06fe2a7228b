"""Opening: pragmas, schema version and migrations, foreign and corrupt files, lifecycle, config."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, StorageError
from edge_agent.store import SCHEMA_VERSION, DeviceStore, StoreConfig, StoreCorrupt
from edge_agent.store.schema import APPLICATION_ID, MIGRATIONS, ensure_schema, schema_version
from tests.edge_agent.store import HOUR, T0, Clock, open_store


def pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_a_new_store_is_wal_versioned_and_marked_as_ours(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock()) as store:
        # synchronous is a per-connection setting: only the store's own connection can show it
        assert store._conn is not None
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    path = tmp_path / "device.db"
    assert pragma(path, "journal_mode") == "wal"
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "application_id") == APPLICATION_ID


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    open_store(tmp_path, Clock()).close()
    path = tmp_path / "device.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")

    with pytest.raises(StorageError, match=r"schema version 99, newer than this agent understands \(1\)") as info:
        DeviceStore.open(path, on_corrupt="move-aside")

    assert str(path) in str(info.value)
    assert pragma(path, "user_version") == 99
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []


def test_a_foreign_sqlite_database_is_refused_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "someone-elses.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE mine (x)")
        conn.execute("INSERT INTO mine VALUES (1)")

    with pytest.raises(StorageError, match="not a fedflock device store"):
        DeviceStore.open(path, on_corrupt="move-aside")

    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT x FROM mine").fetchall() == [(1,)]


def test_the_migration_hook_runs_missing_steps_in_order(tmp_path: Path) -> None:
    open_store(tmp_path, Clock()).close()
    conn = sqlite3.connect(tmp_path / "device.db", isolation_level=None)

    def add_priority(c: sqlite3.Connection) -> None:
        c.execute("ALTER TABLE results ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    try:
        old = ensure_schema(conn, tmp_path / "device.db", migrations={**MIGRATIONS, 1: add_priority}, target=2)
        assert (old, schema_version(conn)) == (1, 2)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(results)")]
        assert "priority" in columns
    finally:
        conn.close()


def test_a_failing_migration_leaves_the_old_schema(tmp_path: Path) -> None:
    open_store(tmp_path, Clock()).close()
    conn = sqlite3.connect(tmp_path / "device.db", isolation_level=None)

    def half_done(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE extra (x)")
        raise RuntimeError("disk pulled mid-migration")

    try:
        with pytest.raises(RuntimeError, match="mid-migration"):
            ensure_schema(conn, tmp_path / "device.db", migrations={**MIGRATIONS, 1: half_done}, target=2)
        assert schema_version(conn) == 1
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'extra'").fetchone()[0] == 0
        with pytest.raises(StorageError, match="no migration from schema version 1 to 2"):
            ensure_schema(conn, tmp_path / "device.db", migrations=MIGRATIONS, target=2)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\xffnot sqlite at all" * 300, b"SQLite format 3\x00" + b"\xff" * 5000],
    ids=["no-sqlite-header", "sqlite-header-then-garbage"],
)
def test_a_garbage_file_fails_by_default_naming_the_path(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "device.db"
    path.write_bytes(garbage)

    with pytest.raises(StoreCorrupt, match="is corrupt") as info:
        DeviceStore.open(path)

    assert str(path) in str(info.value)
    assert info.value.code == "storage_corrupt"
    assert path.read_bytes() == garbage  # evidence untouched


def test_move_aside_keeps_the_corrupt_file_and_starts_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "device.db"
    garbage = b"garbage " * 1000
    path.write_bytes(garbage)
    (tmp_path / "device.db-wal").write_bytes(b"stale wal")

    with caplog.at_level(logging.INFO, logger="fedflock.store"):
        store = DeviceStore.open(path, clock=Clock(T0), on_corrupt="move-aside")
    with store:
        assert store.put_result("r1", 1, b"UPDATE", T0 + HOUR) is True

    moved = tmp_path / "device.db.corrupt-20231114T221320Z"
    assert moved.read_bytes() == garbage
    assert (tmp_path / "device.db.corrupt-20231114T221320Z-wal").read_bytes() == b"stale wal"
    [line] = [r.getMessage() for r in caplog.records if r.name == "fedflock.store"]
    assert f"device store {path} was corrupt" in line and str(moved) in line


def test_a_damaged_page_is_found_at_open(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock()) as store:
        for i in range(20):
            store.put_result(f"r{i}", 1, bytes([i]) * 3000, T0 + HOUR)
    path = tmp_path / "device.db"
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 5 * page] = b"\xa5" * (2 * page)  # leave the header page, wreck two b-tree pages
    path.write_bytes(bytes(data))

    with pytest.raises(StoreCorrupt, match=str(path)):
        DeviceStore.open(path)


def test_open_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DeviceStore.open(tmp_path / "missing" / "device.db")


def test_lifecycle_no_io_in_the_constructor_and_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    unopened = DeviceStore(path)
    assert not path.exists()
    with pytest.raises(StorageError, match="is not open"):
        unopened.sizes()

    with DeviceStore.open(path) as store:
        store.put_fact("k", "1")
    store.close()
    with pytest.raises(StorageError, match="is not open"):
        store.get_fact("k")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"retention_s": 0}, "retention_s"),
        ({"retention_s": float("nan")}, "retention_s"),
        ({"max_result_bytes": 0}, "max_result_bytes"),
        ({"max_result_bytes": 10, "max_outbox_bytes": 5}, "max_outbox_bytes"),
        ({"max_db_bytes": -1}, "max_db_bytes"),
        ({"busy_timeout_s": -1.0}, "busy_timeout_s"),
    ],
)
def test_bad_config_is_a_config_error(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StoreConfig(**fields)  # type: ignore[arg-type]


def test_on_corrupt_must_be_a_known_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_corrupt must be one of"):
        DeviceStore(tmp_path / "device.db", on_corrupt="delete")  # type: ignore[arg-type]
