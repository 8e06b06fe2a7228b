"""The server store's tables, written once for SQLite and PostgreSQL, and their migrations.

The DDL is plain SQL both engines accept; only two type names differ (``{blob}``: BLOB / BYTEA,
``{real}``: REAL / DOUBLE PRECISION, both 8-byte floats). JSON is stored as TEXT so the schema
and every query are the same on both. Booleans are INTEGER 0/1.

Schema version 1::

    fedflock_meta    key TEXT PK, value TEXT            'application', 'schema_version'
    devices          device_id PK, online, bundle_digest, num_examples, agent_version,
                     last_seen, eligibility (JSON), selected_count, accepted_count, failed_count
    model_versions   version PK, parent -> model_versions (older, or NULL), bundle_digest,
                     round, metrics (JSON), weights (tensor set) and/or weights_path, created_at
    rounds           round PK, model_version -> model_versions, status open|completed|abandoned,
                     deadline, config (JSON), created_at, closed_at, reason,
                     result_version -> model_versions
    round_tasks      (round -> rounds, task_id) PK, device_id, state open|accepted|failed,
                     result_key (idempotency key of the result), reason, reported_at
    round_aggregates round PK -> rounds, sums (float64 tensor set; NULL once closed),
                     total_weight, update_count, metric_sums (JSON), updated_at
    strategy_state   name PK, tensors (tensor set), state (JSON), round, updated_at
    rollout_state    name PK, state (JSON), updated_at
    settings         key PK, value (JSON), updated_at

Schema version 2 (update binding, issue #7) adds to ``round_tasks``: ``nonce`` and
``base_digest`` (TEXT, ``''`` for tasks stored before: issued unbound, their updates are
accepted without them), so a restarted server re-sends the same nonce and still refuses replays.

Schema version 3 (scale-out workers, issue #9; :mod:`broker_server.persistence.scaleout`,
docs/scaleout.md) adds four tables, unused by a single server::

    scaleout_rounds   round PK -> rounds, status collecting|closing|closed, updated_at
    scaleout_workers  session PK, worker_id, status alive|fenced|stopped, beats, started_at, updated_at
    scaleout_claims   (round, task_id) PK -> round_tasks: the one worker session that counted the
                      task's result; session -> scaleout_workers, outcome accepted|failed,
                      result_key, weight, reason, flushed (0/1), claimed_at
    scaleout_partials (round, session) PK: a worker's flushed partial aggregate of the round:
                      sums (float64 tensor set), total_weight, update_count, metric_sums (JSON),
                      task_ids (JSON list), flushes, updated_at

``MIGRATIONS[v]`` turns schema ``v`` into ``v + 1`` (step 0 creates version 1), all inside one
transaction with the version bump, so a failed migration leaves the old version; PostgreSQL
and SQLite both have transactional DDL. To change the schema append a step and bump
:data:`SCHEMA_VERSION`; never edit a released step. A database of a newer version, or one that
holds tables named like ours without the meta table, is refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker_server.persistence.errors import StorageError

__all__ = ["APPLICATION", "MIGRATIONS", "SCHEMA_VERSION", "TABLES", "Cursor", "Dialect", "Tx", "ensure_schema"]

APPLICATION = "fedflock-server"
SCHEMA_VERSION = 3
TABLES = frozenset(
    {
        "fedflock_meta",
        "devices",
        "model_versions",
        "rounds",
        "round_tasks",
        "round_aggregates",
        "strategy_state",
        "rollout_state",
        "settings",
        "scaleout_rounds",
        "scaleout_workers",
        "scaleout_claims",
        "scaleout_partials",
    }
)


class Cursor(Protocol):
    """What both ``sqlite3.Cursor`` and ``psycopg.Cursor`` offer."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """The few places where SQLite and PostgreSQL differ."""

    name: str
    blob: str
    real: str
    #: appended to a SELECT that the transaction will update (SQLite locks the whole file anyway)
    for_update: str
    #: SQL listing the current schema's table names
    list_tables: str
    #: statement run first in a migration transaction to serialise concurrent openers ("" if none)
    migration_lock: str
    #: True: the database file is ours alone, so unknown tables mean "not a server store"
    exclusive: bool


class Tx(Protocol):
    """An open transaction; ``?`` placeholders on every backend."""

    dialect: Dialect

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor: ...


_SCHEMA_V1 = (
    "CREATE TABLE fedflock_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE devices (
        device_id      TEXT PRIMARY KEY,
        online         INTEGER NOT NULL DEFAULT 0,
        bundle_digest  TEXT NOT NULL DEFAULT '',
        num_examples   BIGINT NOT NULL DEFAULT 0,
        agent_version  TEXT NOT NULL DEFAULT '',
        last_seen      {real} NOT NULL DEFAULT 0,
        eligibility    TEXT NOT NULL DEFAULT '{{}}',
        selected_count BIGINT NOT NULL DEFAULT 0,
        accepted_count BIGINT NOT NULL DEFAULT 0,
        failed_count   BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE model_versions (
        version       BIGINT PRIMARY KEY,
        parent        BIGINT REFERENCES model_versions (version),
        bundle_digest TEXT NOT NULL,
        round         BIGINT,
        metrics       TEXT NOT NULL,
        weights       {blob},
        weights_path  TEXT,
        created_at    {real} NOT NULL,
        CHECK (weights IS NOT NULL OR weights_path IS NOT NULL),
        CHECK (parent IS NULL OR parent < version)
    )""",
    "CREATE INDEX model_versions_by_parent ON model_versions (parent)",
    """CREATE TABLE rounds (
        round          BIGINT PRIMARY KEY,
        model_version  BIGINT NOT NULL REFERENCES model_versions (version),
        status         TEXT NOT NULL CHECK (status IN ('open', 'completed', 'abandoned')),
        deadline       {real} NOT NULL,
        config         TEXT NOT NULL,
        created_at     {real} NOT NULL,
        closed_at      {real},
        reason         TEXT NOT NULL DEFAULT '',
        result_version BIGINT REFERENCES model_versions (version)
    )""",
    "CREATE INDEX rounds_by_status ON rounds (status, round)",
    """CREATE TABLE round_tasks (
        round       BIGINT NOT NULL REFERENCES rounds (round),
        task_id     TEXT NOT NULL,
        device_id   TEXT NOT NULL,
        state       TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'accepted', 'failed')),
        result_key  TEXT,
        reason      TEXT NOT NULL DEFAULT '',
        reported_at {real},
        PRIMARY KEY (round, task_id),
        CHECK ((state = 'open') = (result_key IS NULL))
    )""",
    """CREATE TABLE round_aggregates (
        round        BIGINT PRIMARY KEY REFERENCES rounds (round),
        sums         {blob},
        total_weight {real} NOT NULL,
        update_count BIGINT NOT NULL,
        metric_sums  TEXT NOT NULL,
        updated_at   {real} NOT NULL
    )""",
    """CREATE TABLE strategy_state (
        name       TEXT PRIMARY KEY,
        tensors    {blob} NOT NULL,
        state      TEXT NOT NULL,
        round      BIGINT,
        updated_at {real} NOT NULL
    )""",
    "CREATE TABLE rollout_state (name TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at {real} NOT NULL)",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {real} NOT NULL)",
)

Migration = Callable[[Tx], None]


def _create_v1(tx: Tx) -> None:
    for statement in _SCHEMA_V1:
        tx.execute(statement.format(blob=tx.dialect.blob, real=tx.dialect.real))


def _bind_tasks_v2(tx: Tx) -> None:
    tx.execute("ALTER TABLE round_tasks ADD COLUMN nonce TEXT NOT NULL DEFAULT ''")
    tx.execute("ALTER TABLE round_tasks ADD COLUMN base_digest TEXT NOT NULL DEFAULT ''")


_SCALEOUT_V3 = (
    """CREATE TABLE scaleout_rounds (
        round      BIGINT PRIMARY KEY REFERENCES rounds (round),
        status     TEXT NOT NULL CHECK (status IN ('collecting', 'closing', 'closed')),
        updated_at {real} NOT NULL
    )""",
    """CREATE TABLE scaleout_workers (
        session    TEXT PRIMARY KEY,
        worker_id  TEXT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('alive', 'fenced', 'stopped')),
        beats      BIGINT NOT NULL DEFAULT 0,
        started_at {real} NOT NULL,
        updated_at {real} NOT NULL
    )""",
    """CREATE TABLE scaleout_claims (
        round      BIGINT NOT NULL,
        task_id    TEXT NOT NULL,
        session    TEXT NOT NULL REFERENCES scaleout_workers (session),
        outcome    TEXT NOT NULL CHECK (outcome IN ('accepted', 'failed')),
        result_key TEXT NOT NULL,
        weight     {real} NOT NULL,
        reason     TEXT NOT NULL DEFAULT '',
        flushed    INTEGER NOT NULL DEFAULT 0,
        claimed_at {real} NOT NULL,
        PRIMARY KEY (round, task_id),
        FOREIGN KEY (round, task_id) REFERENCES round_tasks (round, task_id)
    )""",
    "CREATE INDEX scaleout_claims_by_session ON scaleout_claims (session, round)",
    """CREATE TABLE scaleout_partials (
        round        BIGINT NOT NULL REFERENCES rounds (round),
        session      TEXT NOT NULL REFERENCES scaleout_workers (session),
        sums         {blob},
        total_weight {real} NOT NULL,
        update_count BIGINT NOT NULL,
        metric_sums  TEXT NOT NULL,
        task_ids     TEXT NOT NULL,
        flushes      BIGINT NOT NULL,
        updated_at   {real} NOT NULL,
        PRIMARY KEY (round, session)
    )""",
)


def _scaleout_v3(tx: Tx) -> None:
    for statement in _SCALEOUT_V3:
        tx.execute(statement.format(blob=tx.dialect.blob, real=tx.dialect.real))


MIGRATIONS: Mapping[int, Migration] = {0: _create_v1, 1: _bind_tasks_v2, 2: _scaleout_v3}


def ensure_schema(
    tx: Tx, where: str, *, migrations: Mapping[int, Migration] = MIGRATIONS, target: int = SCHEMA_VERSION
) -> int:
    """Bring the database to schema ``target`` inside the caller's write transaction.

    Returns the version found. ``where`` names the store in error messages.
    """
    if tx.dialect.migration_lock:
        tx.execute(tx.dialect.migration_lock)
    version = _current_version(tx, where)
    if version > target:
        raise StorageError(
            f"server store {where} has schema version {version}, newer than this server understands ({target}); "
            "upgrade fedflock"
        )
    for step in range(version, target):
        migration = migrations.get(step)
        if migration is None:
            raise StorageError(f"server store {where}: no migration from schema version {step} to {step + 1}")
        migration(tx)
    if version == 0:
        tx.execute("INSERT INTO fedflock_meta (key, value) VALUES ('application', ?)", (APPLICATION,))
        tx.execute("INSERT INTO fedflock_meta (key, value) VALUES ('schema_version', ?)", (str(target),))
    elif version != target:
        tx.execute("UPDATE fedflock_meta SET value = ? WHERE key = 'schema_version'", (str(target),))
    return version


def _current_version(tx: Tx, where: str) -> int:
    tables = {str(row[0]).lower() for row in tx.execute(tx.dialect.list_tables).fetchall()}
    if "fedflock_meta" not in tables:
        foreign = tables if tx.dialect.exclusive else tables & TABLES
        if foreign:
            raise StorageError(
                f"{where} holds tables ({', '.join(sorted(foreign)[:5])}) but is not a fedflock server store; "
                "refusing to touch it"
            )
        return 0
    meta = dict(tx.execute("SELECT key, value FROM fedflock_meta").fetchall())
    if meta.get("application") != APPLICATION:
        raise StorageError(f"{where} is not a fedflock server store (application {meta.get('application')!r})")
    try:
        return int(meta["schema_version"])
    except (KeyError, ValueError) as exc:
        raise StorageError(f"server store {where}: bad schema_version {meta.get('schema_version')!r}") from exc
