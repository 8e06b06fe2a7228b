"""The scale option: the server store in PostgreSQL (psycopg 3, ``fedflock[broker]``).

Same schema and queries as SQLite (``schema.py``, ``queries.py``); blobs are ``bytea``. Use it
when several server processes share state, or when the database should live on managed
storage with backups and replicas.

* ``conninfo``: a libpq connection string or URL (``postgresql://user@host/db``,
  ``host=/run/postgresql dbname=fedflock``). Passwords belong in ``~/.pgpass`` or
  ``PGPASSWORD``; they never appear in error messages (only host, port and database do).
* ``schema``: keep the tables in this schema (created if missing) instead of the connection's
  default ``search_path``, e.g. one schema per federation. It is set per session, so use a
  session-mode pooler, not a transaction-mode one.

Writes run at READ COMMITTED and lock the round's row first (``SELECT ... FOR UPDATE``), so two
servers accepting into one round serialise there; reads run at REPEATABLE READ READ ONLY, a
consistent snapshot across the several queries of e.g. :meth:`load_round`. Deadlocks and
serialization failures become :class:`StoreConflict` (retry the call); a lost connection
:class:`StoreUnavailable`, and the next call reconnects.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, ClassVar

from broker_server.persistence.errors import StorageError, StoreConflict, StoreUnavailable
from broker_server.persistence.schema import Cursor, Dialect
from broker_server.persistence.sql import Clock, SqlServerStore
from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

try:
    import psycopg as _psycopg
    from psycopg import errors as _pg_errors
    from psycopg import sql as _pg_sql
except ImportError:  # the broker extra is not installed; PostgresServerStore refuses to start
    _psycopg = None  # type: ignore[assignment]

__all__ = ["POSTGRES", "PostgresServerStore", "psycopg_available"]

POSTGRES = Dialect(
    name="postgresql",
    blob="BYTEA",
    real="DOUBLE PRECISION",
    for_update=" FOR UPDATE",
    list_tables="SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
    # two servers opening a new database at once: the second waits, then finds the schema made
    migration_lock="SELECT pg_advisory_xact_lock(7236857364102751043)",
    exclusive=False,
)


def psycopg_available() -> bool:
    return _psycopg is not None


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    # the shared queries use ``?`` and contain no literal ``?`` or ``%``
    return sql.replace("?", "%s")


class PostgresServerStore(SqlServerStore):
    """The server store in a PostgreSQL database."""

    dialect: ClassVar[Dialect] = POSTGRES
    _begin_write: ClassVar[str] = "BEGIN ISOLATION LEVEL READ COMMITTED"
    _begin_read: ClassVar[str] = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    _driver_errors: ClassVar[tuple[type[Exception], ...]] = (_psycopg.Error,) if _psycopg is not None else ()

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str | None = None,
        connect_timeout_s: float = 10.0,
        clock: Clock = time.time,
    ) -> None:
        if schema is not None and not schema:
            raise ConfigError("schema must be a non-empty name or None")
        if not connect_timeout_s > 0:
            raise ConfigError(f"connect_timeout_s must be positive, got {connect_timeout_s!r}")
        super().__init__(clock=clock)
        self._conninfo = conninfo
        self._schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._where = _describe(conninfo, schema)

    @classmethod
    def open(
        cls,
        conninfo: str,
        *,
        schema: str | None = None,
        connect_timeout_s: float = 10.0,
        clock: Clock = time.time,
    ) -> PostgresServerStore:
        """Construct and :meth:`start` (connect, create or migrate)."""
        store = cls(conninfo, schema=schema, connect_timeout_s=connect_timeout_s, clock=clock)
        store.start()
        return store

    @property
    def where(self) -> str:
        return self._where

    def _connect(self) -> psycopg.Connection[Any]:
        if _psycopg is None:
            raise ConfigError("the PostgreSQL server store needs psycopg: pip install 'fedflock[broker]'")
        conn = _psycopg.connect(self._conninfo, autocommit=True, connect_timeout=max(1, round(self._connect_timeout_s)))
        try:
            if self._schema is not None:
                ident = _pg_sql.Identifier(self._schema)
                # under the migration lock: CREATE SCHEMA IF NOT EXISTS from two connections at once
                # (a coordinator and its workers starting together) can fail on pg_namespace
                with conn.transaction():
                    conn.execute(POSTGRES.migration_lock)
                    conn.execute(_pg_sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                conn.execute(_pg_sql.SQL("SET search_path TO {}").format(ident))
        except BaseException:
            conn.close()
            raise
        return conn

    def _disconnect(self, conn: Any) -> None:
        conn.close()

    def _usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def _execute(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Cursor:
        cursor: Cursor = conn.execute(_placeholders(sql), params)
        return cursor

    def _translate(self, exc: Exception, action: str) -> StorageError:
        message = f"server store {self._where}: could not {action} ({str(exc).strip()})"
        if isinstance(exc, _pg_errors.IntegrityError):
            return StoreConflict(message)
        if isinstance(exc, _pg_errors.TransactionRollback):  # deadlock, serialization failure
            return StoreConflict(f"{message}; a concurrent transaction won, retry")
        if isinstance(exc, _pg_errors.DiskFull):
            return StorageError(f"{message}: disk full")
        if isinstance(exc, _psycopg.OperationalError):
            return StoreUnavailable(message)
        return StorageError(message)


def _describe(conninfo: str, schema: str | None) -> str:
    """``postgresql://host:port/dbname[#schema]`` without user or password."""
    params: dict[str, Any] = {}
    if _psycopg is not None:
        try:
            params = _psycopg.conninfo.conninfo_to_dict(conninfo)
        except _psycopg.ProgrammingError as exc:
            raise ConfigError(f"bad PostgreSQL connection string: {exc}") from exc
    host = params.get("host", "")
    port = f":{params['port']}" if params.get("port") else ""
    suffix = f"#{schema}" if schema else ""
    return f"postgresql://{host}{port}/{params.get('dbname', '')}{suffix}"
