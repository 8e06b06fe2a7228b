"""The :class:`~broker_server.persistence.base.ServerStore` implementation shared by every SQL backend.

A backend (``sqlite.py``, ``postgres.py``) supplies a connection, its driver's error translation
and a :class:`~broker_server.persistence.schema.Dialect`; everything else, including every
query (``queries.py``), is written once here.

Transactions: every public method is one transaction, begun explicitly on an autocommit
connection (``BEGIN`` / ``COMMIT``), rolled back whole on any exception, driver error or not.
Encoding (tensors, JSON) happens before the transaction starts, so a bad value never leaves a
transaction half-done and never holds a lock while numpy works.

Threads: one connection per store object, every call serialised by a lock (calls last
milliseconds; a connection per thread would only contend for the same database locks). Several
store objects or processes on one database are safe: SQLite serialises writers with its file
lock (``BEGIN IMMEDIATE``), PostgreSQL with row locks (``SELECT ... FOR UPDATE`` on the round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from broker_server.persistence import queries
from broker_server.persistence.errors import StorageError, StoreConflict
from broker_server.persistence.records import (
    AggregateCheckpoint,
    DeviceRow,
    ModelVersionRow,
    RoundRow,
    RoundSnapshot,
    StrategyStateRow,
)
from broker_server.persistence.schema import Cursor, Dialect, Tx, ensure_schema
from edge_agent.protocol.tensors import encode_tensors

__all__ = ["SqlServerStore"]

logger = logging.getLogger("fedflock.server.store")

Clock = Callable[[], float]


class _Transaction:
    def __init__(self, store: SqlServerStore, conn: Any) -> None:
        self.dialect = store.dialect
        self._store = store
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Cursor:
        return self._store._execute(self._conn, sql, params)


def _encode(tensors: Mapping[str, np.ndarray], what: str, dtype: type | None = None) -> bytes:
    try:
        arrays = {name: np.asarray(value, dtype=dtype) for name, value in tensors.items()}
        return encode_tensors(arrays)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"cannot store {what}: {exc}") from exc


class SqlServerStore(ABC):
    """Everything but the connection. The constructor does no I/O; :meth:`start` connects."""

    dialect: ClassVar[Dialect]
    _begin_write: ClassVar[str] = "BEGIN"
    _begin_read: ClassVar[str] = "BEGIN"
    _driver_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self, *, clock: Clock = time.time) -> None:
        """``clock``: wall-clock seconds for the times the store stamps (``reported_at``, ...)."""
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: Any = None

    # -- backend hooks -----------------------------------------------------------------------

    @property
    @abstractmethod
    def where(self) -> str:
        """The store's name in messages: a path, or host/database (never a password)."""

    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def _disconnect(self, conn: Any) -> None: ...

    @abstractmethod
    def _execute(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Cursor: ...

    @abstractmethod
    def _translate(self, exc: Exception, action: str) -> StorageError: ...

    def _usable(self, conn: Any) -> bool:
        """False if the connection is known to be dead (it is then reopened)."""
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and create or migrate the schema (one transaction)."""
        with self._lock:
            if self._conn is not None:
                raise StorageError(f"server store {self.where} is already open")
            self._conn = self._connect_checked()
            try:
                with self._transaction("create or migrate the schema", write=True) as tx:
                    ensure_schema(tx, self.where)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    self._disconnect(conn)
                except self._driver_errors as exc:
                    raise self._translate(exc, "close the connection") from exc

    def __enter__(self) -> SqlServerStore:
        if self._conn is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._transaction("read the schema version", write=False) as tx:
            return int(tx.execute("SELECT value FROM fedflock_meta WHERE key = 'schema_version'").fetchone()[0])

    # -- devices -----------------------------------------------------------------------------

    def upsert_device(self, device: DeviceRow) -> None:
        eligibility = queries.dumps(dict(device.eligibility))
        with self._transaction("store the device", write=True) as tx:
            queries.upsert_device(tx, device, eligibility)

    def get_device(self, device_id: str) -> DeviceRow | None:
        with self._transaction("read the device", write=False) as tx:
            found = queries.select_devices(tx, device_id)
        return found[0] if found else None

    def devices(self) -> list[DeviceRow]:
        with self._transaction("read the devices", write=False) as tx:
            return queries.select_devices(tx)

    def count_participation(self, counter: str, device_ids: Sequence[str]) -> None:
        if counter not in ("selected", "accepted", "failed"):
            raise ValueError(f"not a participation counter: {counter!r}")
        with self._transaction(f"count {len(device_ids)} {counter} tasks", write=True) as tx:
            for device_id in sorted(device_ids):  # one lock order, as in insert_round
                queries.count_participation(tx, device_id, f"{counter}_count")

    # -- rounds ------------------------------------------------------------------------------

    def create_round(self, round_: RoundRow) -> None:
        config = queries.dumps(dict(round_.config))
        with self._transaction(f"create round {round_.round}", write=True) as tx:
            queries.insert_round(tx, round_, config)

    def record_acceptance(self, round_: int, task_id: str, *, key: str, checkpoint: AggregateCheckpoint) -> bool:
        if task_id not in checkpoint.accepted:
            raise StoreConflict(f"round {round_}: the checkpoint for task {task_id!r} does not include it")
        sums = _encode(checkpoint.sums, f"the aggregate of round {round_}", np.float64)
        with self._transaction(f"accept task {task_id!r} of round {round_}", write=True) as tx:
            open_ = queries.lock_round(tx, round_)
            device = queries.claim_task(tx, round_, task_id, key, "accepted", "", self._clock(), round_open=open_)
            if device is None:
                return False
            queries.write_aggregate(tx, round_, checkpoint, sums, self._clock())
            queries.count_participation(tx, device, "accepted_count")
        return True

    def record_failure(self, round_: int, task_id: str, *, key: str, reason: str) -> bool:
        with self._transaction(f"record the failure of task {task_id!r} of round {round_}", write=True) as tx:
            open_ = queries.lock_round(tx, round_)
            device = queries.claim_task(tx, round_, task_id, key, "failed", reason, self._clock(), round_open=open_)
            if device is None:
                return False
            queries.count_participation(tx, device, "failed_count")
        return True

    def complete_round(
        self, round_: int, *, version: ModelVersionRow, strategy: StrategyStateRow | None = None
    ) -> None:
        if version.round is None:
            version = dataclasses.replace(version, round=round_)
        elif version.round != round_:
            raise ValueError(f"model version {version.version} says round {version.round}, completing {round_}")
        metrics, weights = self._version_values(version)
        strategy_values = self._strategy_values(strategy) if strategy is not None else None
        with self._transaction(f"complete round {round_}", write=True) as tx:
            if not queries.lock_round(tx, round_):
                raise StoreConflict(f"round {round_} is already closed")
            queries.insert_version(tx, version, metrics, weights)
            queries.close_round(tx, round_, "completed", "", self._clock(), version.version)
            if strategy is not None and strategy_values is not None:
                queries.put_strategy(tx, strategy, *strategy_values, self._clock())

    def abandon_round(self, round_: int, *, reason: str) -> None:
        with self._transaction(f"abandon round {round_}", write=True) as tx:
            if not queries.lock_round(tx, round_):
                raise StoreConflict(f"round {round_} is already closed")
            queries.close_round(tx, round_, "abandoned", reason, self._clock(), None)

    def load_round(self, round_: int) -> RoundSnapshot:
        with self._transaction(f"read round {round_}", write=False) as tx:
            return queries.select_round(tx, round_)

    def open_rounds(self) -> list[int]:
        with self._transaction("list the open rounds", write=False) as tx:
            rows = tx.execute("SELECT round FROM rounds WHERE status = 'open' ORDER BY round").fetchall()
        return [int(r[0]) for r in rows]

    def last_round(self) -> int | None:
        with self._transaction("read the last round", write=False) as tx:
            row = tx.execute("SELECT max(round) FROM rounds").fetchone()
        return None if row[0] is None else int(row[0])

    # -- model versions ----------------------------------------------------------------------

    def put_model_version(self, version: ModelVersionRow) -> None:
        metrics, weights = self._version_values(version)
        with self._transaction(f"store model version {version.version}", write=True) as tx:
            queries.insert_version(tx, version, metrics, weights)

    def get_model_version(self, version: int, *, weights: bool = True) -> ModelVersionRow | None:
        with self._transaction(f"read model version {version}", write=False) as tx:
            return queries.select_version(tx, version, weights=weights)

    def model_versions(self) -> list[int]:
        with self._transaction("list the model versions", write=False) as tx:
            rows = tx.execute("SELECT version FROM model_versions ORDER BY version").fetchall()
        return [int(r[0]) for r in rows]

    def lineage(self, version: int) -> list[ModelVersionRow]:
        with self._transaction(f"read the lineage of model version {version}", write=False) as tx:
            return queries.select_lineage(tx, version)

    @staticmethod
    def _version_values(version: ModelVersionRow) -> tuple[str, bytes | None]:
        if version.weights is None and version.weights_path is None:
            raise ValueError(f"model version {version.version}: give weights, weights_path or both")
        weights = None if version.weights is None else _encode(version.weights, f"model version {version.version}")
        return queries.dumps(dict(version.metrics)), weights

    # -- strategy, rollout, settings ---------------------------------------------------------

    def put_strategy_state(self, state: StrategyStateRow) -> None:
        """Store ``state`` (replacing the last one of that name); ``updated_at`` is the store's clock."""
        values = self._strategy_values(state)
        with self._transaction(f"store strategy state {state.name!r}", write=True) as tx:
            queries.put_strategy(tx, state, *values, self._clock())

    @staticmethod
    def _strategy_values(state: StrategyStateRow) -> tuple[bytes, str]:
        return _encode(state.tensors, f"strategy state {state.name!r}"), queries.dumps(dict(state.state))

    def get_strategy_state(self, name: str) -> StrategyStateRow | None:
        with self._transaction(f"read strategy state {name!r}", write=False) as tx:
            row = tx.execute(
                "SELECT tensors, state, round, updated_at FROM strategy_state WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return None
            return StrategyStateRow(
                name=name,
                tensors=queries.decode(row[0], f"strategy state {name!r}"),
                state=queries.loads(row[1]),
                round=None if row[2] is None else int(row[2]),
                updated_at=float(row[3]),
            )

    def put_rollout_state(self, name: str, state: Mapping[str, Any]) -> None:
        value = queries.dumps(dict(state))
        with self._transaction(f"store rollout state {name!r}", write=True) as tx:
            queries.put_value(tx, "rollout_state", name, value, self._clock())

    def get_rollout_state(self, name: str) -> dict[str, Any] | None:
        with self._transaction(f"read rollout state {name!r}", write=False) as tx:
            text = queries.get_value(tx, "rollout_state", name)
        return None if text is None else dict(queries.loads(text))

    def put_setting(self, key: str, value: Any) -> None:
        text = queries.dumps(value)
        with self._transaction(f"store setting {key!r}", write=True) as tx:
            queries.put_value(tx, "settings", key, text, self._clock())

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self._transaction(f"read setting {key!r}", write=False) as tx:
            text = queries.get_value(tx, "settings", key)
        return default if text is None else queries.loads(text)

    # -- plumbing ----------------------------------------------------------------------------

    def _connect_checked(self) -> Any:
        try:
            return self._connect()
        except self._driver_errors as exc:
            raise self._translate(exc, "connect") from exc

    def _connection(self) -> Any:
        if self._conn is None:
            raise StorageError(f"server store {self.where} is not open")
        if not self._usable(self._conn):
            logger.warning("server store %s: connection lost, reconnecting", self.where)
            with contextlib.suppress(*self._driver_errors):  # it is dead already
                self._disconnect(self._conn)
            self._conn = None
            self._conn = self._connect_checked()
        return self._conn

    def transaction(self, action: str, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        """One transaction for a store extension in this package (e.g. ``scaleout.py``): the same
        lock, BEGIN/COMMIT and rollback on any exception as every method here; ``action`` names it
        in errors."""
        return self._transaction(action, write=write)

    @contextmanager
    def _transaction(self, action: str, *, write: bool) -> Iterator[_Transaction]:
        """One transaction under the lock; rolled back whole on any exception."""
        with self._lock:
            conn = self._connection()
            try:
                self._execute(conn, self._begin_write if write else self._begin_read, ())
                yield _Transaction(self, conn)
                self._execute(conn, "COMMIT", ())
            except self._driver_errors as exc:
                self._rollback(conn)
                raise self._translate(exc, action) from exc
            except BaseException:
                self._rollback(conn)
                raise

    def _rollback(self, conn: Any) -> None:
        try:
            self._execute(conn, "ROLLBACK", ())
        except self._driver_errors as exc:
            # no transaction open (the driver rolled back already) or the connection is gone;
            # either way nothing of this transaction was committed
            logger.debug("server store %s: rollback: %s", self.where, exc)
