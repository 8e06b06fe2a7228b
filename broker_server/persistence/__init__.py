"""The broker server's durable state (issue #6): one store interface, SQLite and PostgreSQL backends.

:class:`ServerStore` (``base.py``) is the interface: devices with their participation counters,
rounds with their tasks and partial aggregate checkpoint, model versions with lineage, metrics
and weights, strategy state, rollout state and settings. :class:`SqliteServerStore` (one file,
WAL) is the default; :class:`PostgresServerStore` (psycopg 3) the scale option. Both run the
same SQL (``schema.py``, ``queries.py``) through one implementation (``sql.py``) and pass the
same contract tests (``tests/broker_server/persistence``).

The guarantee that makes a restart safe: :meth:`ServerStore.record_acceptance` marks a task
accepted and stores the round's new aggregate in one transaction, and refuses a checkpoint
that was not built on the stored one. After a crash an update is either in the stored sums and
marked accepted, or in neither (and its device's re-sent copy is accepted then).
:mod:`broker_server.persistence.resume` turns a live ``RoundState`` into a checkpoint and a
stored round back into a ``RoundState``.

:func:`open_server_store` picks the backend from a URL::

    sqlite:///var/lib/fedflock/server.db        (or a plain path)
    postgresql://fedflock@db.internal/fedflock  (any libpq URL; ``?options=...`` as libpq allows)
"""

from __future__ import annotations

import time
from pathlib import Path

from broker_server.persistence.base import ServerStore
from broker_server.persistence.errors import RecordNotFound, StorageError, StoreConflict, StoreUnavailable
from broker_server.persistence.postgres import PostgresServerStore, psycopg_available
from broker_server.persistence.records import (
    AggregateCheckpoint,
    DeviceRow,
    ModelVersionRow,
    RoundRow,
    RoundSnapshot,
    StrategyStateRow,
    TaskRow,
)
from broker_server.persistence.schema import SCHEMA_VERSION
from broker_server.persistence.sql import Clock, SqlServerStore
from broker_server.persistence.sqlite import SqliteServerStore

__all__ = [
    "SCHEMA_VERSION",
    "AggregateCheckpoint",
    "DeviceRow",
    "ModelVersionRow",
    "PostgresServerStore",
    "RecordNotFound",
    "RoundRow",
    "RoundSnapshot",
    "ServerStore",
    "SqlServerStore",
    "SqliteServerStore",
    "StorageError",
    "StoreConflict",
    "StoreUnavailable",
    "StrategyStateRow",
    "TaskRow",
    "open_server_store",
    "psycopg_available",
]


def open_server_store(url: str, *, schema: str | None = None, clock: Clock = time.time) -> SqlServerStore:
    """Open (create or migrate) the store at ``url``: ``sqlite:///path``, a path, or ``postgresql://...``.

    ``schema`` applies to PostgreSQL only.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresServerStore.open(url, schema=schema, clock=clock)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    return SqliteServerStore.open(Path(path), clock=clock)
