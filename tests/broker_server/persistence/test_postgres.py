"""What only the PostgreSQL backend has: connection errors, reconnects, schemas, URLs."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from broker_server.persistence import PostgresServerStore, StoreUnavailable, open_server_store, psycopg_available
from broker_server.persistence.postgres_process import PostgresProcess
from edge_agent.errors import ConfigError

pytestmark = pytest.mark.skipif(not psycopg_available(), reason="psycopg is not installed")


def _schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def test_unreachable_server_is_unavailable_and_the_password_is_not_shown() -> None:
    store = PostgresServerStore("host=/nonexistent port=1 dbname=fed user=u password=hunter2", connect_timeout_s=1)
    with pytest.raises(StoreUnavailable) as info:
        store.start()
    assert "hunter2" not in str(info.value) and "postgresql:///nonexistent:1/fed" in str(info.value)


def test_bad_connection_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="connection string"):
        PostgresServerStore("host=x bogus")


def test_a_killed_connection_is_reported_then_reopened(postgres_server: PostgresProcess) -> None:
    import psycopg

    conninfo = postgres_server.conninfo("fedflock_test")
    store = PostgresServerStore.open(conninfo, schema=_schema())
    store.put_setting("x", 1)
    pid = store._conn.info.backend_pid
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.01)
    with pytest.raises(StoreUnavailable):
        store.get_setting("x")
    assert store.get_setting("x") == 1  # reconnected, in the same schema
    assert store._conn.info.backend_pid != pid
    store.close()


def test_schemas_keep_federations_apart(postgres_server: PostgresProcess) -> None:
    conninfo = postgres_server.conninfo("fedflock_test")
    with (
        PostgresServerStore.open(conninfo, schema=_schema()) as one,
        PostgresServerStore.open(conninfo, schema=_schema()) as two,
    ):
        one.put_setting("name", "one")
        two.put_setting("name", "two")
        assert (one.get_setting("name"), two.get_setting("name")) == ("one", "two")


def test_open_server_store_takes_a_postgresql_url(postgres_server: PostgresProcess) -> None:
    url = f"postgresql://postgres@/fedflock_test?host={postgres_server.socket_dir}&port={postgres_server.port}"
    store = open_server_store(url, schema=_schema())
    try:
        assert isinstance(store, PostgresServerStore)
        store.put_setting("ok", True)
        assert store.get_setting("ok") is True
        assert store.where.endswith("/fedflock_test#" + store.where.split("#")[1])
    finally:
        store.close()


def _open_together(conninfo: str, schema: str, count: int) -> list[BaseException]:
    """``count`` threads open the store on ``schema`` at the same instant; the errors they met."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []
    stores: list[PostgresServerStore] = []

    def open_store() -> None:
        barrier.wait()
        try:
            stores.append(PostgresServerStore.open(conninfo, schema=schema))
        except Exception as exc:  # collected and asserted by the caller
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for store in stores:
        store.close()
    return errors if len(stores) + len(errors) == count else [*errors, TimeoutError("a thread hung")]


def test_processes_starting_together_on_a_new_schema_all_open_it(postgres_server: PostgresProcess) -> None:
    # a coordinator and its workers start at once on a fresh schema: CREATE SCHEMA IF NOT EXISTS
    # from two connections at the same moment can fail on pg_namespace (it did within the first
    # few of 40 rounds before the schema was created under the migration lock)
    conninfo = postgres_server.conninfo("fedflock_test")
    for _ in range(20):
        assert _open_together(conninfo, f"race_{uuid.uuid4().hex[:10]}", 6) == []
