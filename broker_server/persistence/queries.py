"""The store's SQL, one function per step, each run inside a transaction the caller owns.

Shared by every backend (``?`` placeholders; the PostgreSQL transaction rewrites them). Functions
raise :mod:`broker_server.persistence.errors` for rule violations; driver errors propagate for
the store to translate. Encoding happens before a transaction starts (see ``sql.py``); decoding
of tensors here copies them into writable arrays.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from broker_server.persistence.errors import RecordNotFound, StorageError, StoreConflict
from broker_server.persistence.records import (
    AggregateCheckpoint,
    DeviceRow,
    ModelVersionRow,
    RoundRow,
    RoundSnapshot,
    StrategyStateRow,
    TaskRow,
)
from broker_server.persistence.schema import Tx
from edge_agent.errors import ProtocolError
from edge_agent.protocol.binding import TaskBinding
from edge_agent.protocol.tensors import decode_tensors

# -- encoding ------------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    # NaN and inf are kept (as Python's json writes them): a metric is stored as reported
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str) -> Any:
    return json.loads(text)


def decode(blob: bytes | memoryview, what: str) -> dict[str, np.ndarray]:
    """Writable copies of a stored tensor set (``StorageError`` if it does not decode)."""
    try:
        return {name: np.array(value) for name, value in decode_tensors(bytes(blob)).items()}
    except ProtocolError as exc:
        raise StorageError(f"stored {what} is not a valid tensor set: {exc.reason}") from exc


# -- devices -------------------------------------------------------------------------------------

_DEVICE_COLUMNS = (
    "device_id, online, bundle_digest, num_examples, agent_version, last_seen, eligibility,"
    " selected_count, accepted_count, failed_count"
)


def upsert_device(tx: Tx, device: DeviceRow, eligibility: str) -> None:
    tx.execute(
        "INSERT INTO devices (device_id, online, bundle_digest, num_examples, agent_version, last_seen, eligibility)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET online = excluded.online,"
        " bundle_digest = excluded.bundle_digest, num_examples = excluded.num_examples,"
        " agent_version = excluded.agent_version, last_seen = excluded.last_seen, eligibility = excluded.eligibility",
        (
            device.device_id,
            int(device.online),
            device.bundle_digest,
            device.num_examples,
            device.agent_version,
            device.last_seen,
            eligibility,
        ),
    )


def select_devices(tx: Tx, device_id: str | None = None) -> list[DeviceRow]:
    where, params = ("WHERE device_id = ?", (device_id,)) if device_id is not None else ("", ())
    rows = tx.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices {where} ORDER BY device_id", params).fetchall()
    return [
        DeviceRow(
            device_id=r[0],
            online=bool(r[1]),
            bundle_digest=r[2],
            num_examples=int(r[3]),
            agent_version=r[4],
            last_seen=float(r[5]),
            eligibility=json.loads(r[6]),
            selected=int(r[7]),
            accepted=int(r[8]),
            failed=int(r[9]),
        )
        for r in rows
    ]


def count_participation(tx: Tx, device_id: str, column: str) -> None:
    """Add one to a device's counter, creating a bare record for a device never seen."""
    if column not in ("selected_count", "accepted_count", "failed_count"):
        raise ValueError(f"not a participation counter: {column!r}")
    tx.execute("INSERT INTO devices (device_id) VALUES (?) ON CONFLICT (device_id) DO NOTHING", (device_id,))
    tx.execute(f"UPDATE devices SET {column} = {column} + 1 WHERE device_id = ?", (device_id,))


# -- rounds --------------------------------------------------------------------------------------


def insert_round(tx: Tx, round_: RoundRow, config: str) -> None:
    if round_.status != "open":
        raise StoreConflict(f"round {round_.round} must be created open, not {round_.status!r}")
    if tx.execute("SELECT 1 FROM rounds WHERE round = ?", (round_.round,)).fetchone() is not None:
        raise StoreConflict(f"round {round_.round} already exists")
    require_version(tx, round_.model_version, f"round {round_.round}'s model version")
    tx.execute(
        "INSERT INTO rounds (round, model_version, status, deadline, config, created_at)"
        " VALUES (?, ?, 'open', ?, ?, ?)",
        (round_.round, round_.model_version, round_.deadline, config, round_.created_at),
    )
    # sorted: concurrent rounds lock shared device rows in one order, so they cannot deadlock
    for task_id, device_id in sorted(round_.tasks.items(), key=lambda item: (item[1], item[0])):
        binding = round_.bindings.get(task_id, TaskBinding())
        tx.execute(
            "INSERT INTO round_tasks (round, task_id, device_id, nonce, base_digest) VALUES (?, ?, ?, ?, ?)",
            (round_.round, task_id, device_id, binding.nonce, binding.base_digest),
        )
        count_participation(tx, device_id, "selected_count")


def lock_round(tx: Tx, round_: int) -> bool:
    """Lock the round's row for this transaction; True if it is open (``RecordNotFound`` if unknown)."""
    row = tx.execute(f"SELECT status FROM rounds WHERE round = ?{tx.dialect.for_update}", (round_,)).fetchone()
    if row is None:
        raise RecordNotFound(f"round {round_} is not stored")
    return bool(row[0] == "open")


def claim_task(
    tx: Tx, round_: int, task_id: str, key: str, state: str, reason: str, at: float, *, round_open: bool
) -> str | None:
    """Give an open task its result; returns its device id, or None if it already had a result.

    A task that already has a result is answered None even once the round is closed (a late
    re-delivery); a task without one in a closed round is a ``StoreConflict``.
    """
    row = tx.execute(
        "SELECT device_id, state FROM round_tasks WHERE round = ? AND task_id = ?", (round_, task_id)
    ).fetchone()
    if row is None:
        raise RecordNotFound(f"round {round_} has no task {task_id!r}")
    if row[1] != "open":
        return None
    if not round_open:
        raise StoreConflict(f"round {round_} is closed; task {task_id!r} can no longer report")
    tx.execute(
        "UPDATE round_tasks SET state = ?, result_key = ?, reason = ?, reported_at = ?"
        " WHERE round = ? AND task_id = ? AND state = 'open'",
        (state, key, reason, at, round_, task_id),
    )
    return str(row[0])


def accepted_tasks(tx: Tx, round_: int) -> frozenset[str]:
    rows = tx.execute("SELECT task_id FROM round_tasks WHERE round = ? AND state = 'accepted'", (round_,)).fetchall()
    return frozenset(str(r[0]) for r in rows)


def write_aggregate(tx: Tx, round_: int, checkpoint: AggregateCheckpoint, sums: bytes, at: float) -> None:
    """Store the round's checkpoint; it must cover exactly the tasks marked accepted."""
    stored = accepted_tasks(tx, round_)
    if checkpoint.accepted != stored:
        extra, missing = sorted(checkpoint.accepted - stored), sorted(stored - checkpoint.accepted)
        raise StoreConflict(
            f"round {round_}: checkpoint is not built on the stored one (not accepted: {extra[:3]}, "
            f"missing: {missing[:3]}); it would count an update twice or lose one"
        )
    tx.execute(
        "INSERT INTO round_aggregates (round, sums, total_weight, update_count, metric_sums, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (round) DO UPDATE SET sums = excluded.sums,"
        " total_weight = excluded.total_weight, update_count = excluded.update_count,"
        " metric_sums = excluded.metric_sums, updated_at = excluded.updated_at",
        (round_, sums, checkpoint.total_weight, checkpoint.count, dumps(dict(checkpoint.metric_sums)), at),
    )


def close_round(tx: Tx, round_: int, status: str, reason: str, at: float, result_version: int | None) -> None:
    tx.execute(
        "UPDATE rounds SET status = ?, reason = ?, closed_at = ?, result_version = ? WHERE round = ?",
        (status, reason, at, result_version, round_),
    )
    tx.execute("UPDATE round_aggregates SET sums = NULL, updated_at = ? WHERE round = ?", (at, round_))


def select_round(tx: Tx, round_: int) -> RoundSnapshot:
    row = tx.execute(
        "SELECT round, model_version, status, deadline, config, created_at, closed_at, reason, result_version"
        " FROM rounds WHERE round = ?",
        (round_,),
    ).fetchone()
    if row is None:
        raise RecordNotFound(f"round {round_} is not stored")
    task_rows = tx.execute(
        "SELECT task_id, device_id, state, result_key, reason, reported_at, nonce, base_digest FROM round_tasks"
        " WHERE round = ? ORDER BY task_id",
        (round_,),
    ).fetchall()
    tasks = tuple(
        TaskRow(
            task_id=t[0],
            device_id=t[1],
            state=t[2],
            key=t[3],
            reason=t[4],
            reported_at=None if t[5] is None else float(t[5]),
            nonce=t[6],
            base_digest=t[7],
        )
        for t in task_rows
    )
    record = RoundRow(
        round=int(row[0]),
        model_version=int(row[1]),
        status=row[2],
        deadline=float(row[3]),
        config=json.loads(row[4]),
        created_at=float(row[5]),
        closed_at=None if row[6] is None else float(row[6]),
        reason=row[7],
        result_version=None if row[8] is None else int(row[8]),
        tasks={t.task_id: t.device_id for t in tasks},
        bindings={t.task_id: TaskBinding(t.nonce, t.base_digest) for t in tasks if t.nonce},
    )
    return RoundSnapshot(round=record, tasks=tasks, checkpoint=_select_checkpoint(tx, round_, tasks))


def _select_checkpoint(tx: Tx, round_: int, tasks: tuple[TaskRow, ...]) -> AggregateCheckpoint:
    accepted = frozenset(t.task_id for t in tasks if t.state == "accepted")
    row = tx.execute(
        "SELECT sums, total_weight, update_count, metric_sums FROM round_aggregates WHERE round = ?", (round_,)
    ).fetchone()
    if row is None:
        if accepted:
            raise StorageError(f"round {round_} has accepted tasks but no aggregate checkpoint")
        return AggregateCheckpoint()
    if int(row[2]) != len(accepted):
        raise StorageError(f"round {round_}: checkpoint counts {row[2]} updates, {len(accepted)} tasks are accepted")
    return AggregateCheckpoint(
        sums={} if row[0] is None else decode(row[0], f"aggregate of round {round_}"),
        total_weight=float(row[1]),
        count=int(row[2]),
        accepted=accepted,
        metric_sums={str(k): float(v) for k, v in json.loads(row[3]).items()},
    )


# -- model versions ------------------------------------------------------------------------------


def require_version(tx: Tx, version: int, what: str) -> None:
    if tx.execute("SELECT 1 FROM model_versions WHERE version = ?", (version,)).fetchone() is None:
        raise RecordNotFound(f"{what} v{version} is not stored")


def insert_version(tx: Tx, version: ModelVersionRow, metrics: str, weights: bytes | None) -> None:
    if tx.execute("SELECT 1 FROM model_versions WHERE version = ?", (version.version,)).fetchone() is not None:
        raise StoreConflict(f"model version {version.version} is already stored")
    if version.parent is not None:
        require_version(tx, version.parent, f"parent of model version {version.version}:")
    tx.execute(
        "INSERT INTO model_versions (version, parent, bundle_digest, round, metrics, weights, weights_path, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            version.version,
            version.parent,
            version.bundle_digest,
            version.round,
            metrics,
            weights,
            version.weights_path,
            version.created_at,
        ),
    )


_VERSION_COLUMNS = "mv.version, mv.parent, mv.bundle_digest, mv.round, mv.metrics, mv.weights_path, mv.created_at"


def select_version(tx: Tx, version: int, *, weights: bool) -> ModelVersionRow | None:
    extra = ", mv.weights" if weights else ""
    sql = f"SELECT {_VERSION_COLUMNS}{extra} FROM model_versions mv WHERE version = ?"
    row = tx.execute(sql, (version,)).fetchone()
    if row is None:
        return None
    blob = row[7] if weights else None
    tensors = decode(blob, f"weights of model version {version}") if blob is not None else None
    return _version_row(row, tensors)


def select_lineage(tx: Tx, version: int) -> list[ModelVersionRow]:
    # parent < version is a CHECK constraint, so the recursion always ends
    rows = tx.execute(
        "WITH RECURSIVE chain (version, depth) AS ("
        " SELECT version, 0 FROM model_versions WHERE version = ?"
        " UNION ALL SELECT m.parent, c.depth + 1 FROM model_versions m JOIN chain c ON m.version = c.version"
        " WHERE m.parent IS NOT NULL)"
        f" SELECT {_VERSION_COLUMNS} FROM chain JOIN model_versions mv ON mv.version = chain.version"
        " ORDER BY chain.depth",
        (version,),
    ).fetchall()
    return [_version_row(row, None) for row in rows]


def _version_row(row: Any, tensors: dict[str, np.ndarray] | None) -> ModelVersionRow:
    return ModelVersionRow(
        version=int(row[0]),
        parent=None if row[1] is None else int(row[1]),
        bundle_digest=row[2],
        round=None if row[3] is None else int(row[3]),
        metrics=json.loads(row[4]),
        weights_path=row[5],
        created_at=float(row[6]),
        weights=tensors,
    )


# -- strategy state and key/value tables ----------------------------------------------------------------------------


def put_strategy(tx: Tx, state: StrategyStateRow, tensors: bytes, json_state: str, at: float) -> None:
    tx.execute(
        "INSERT INTO strategy_state (name, tensors, state, round, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET tensors = excluded.tensors, state = excluded.state,"
        " round = excluded.round, updated_at = excluded.updated_at",
        (state.name, tensors, json_state, state.round, at),
    )


_KEY_VALUE = {"settings": ("key", "value"), "rollout_state": ("name", "state")}


def put_value(tx: Tx, table: str, key: str, value: str, at: float) -> None:
    key_column, value_column = _KEY_VALUE[table]
    tx.execute(
        f"INSERT INTO {table} ({key_column}, {value_column}, updated_at) VALUES (?, ?, ?)"
        f" ON CONFLICT ({key_column}) DO UPDATE SET {value_column} = excluded.{value_column},"
        " updated_at = excluded.updated_at",
        (key, value, at),
    )


def get_value(tx: Tx, table: str, key: str) -> str | None:
    """The JSON text stored under ``key``, None if there is none."""
    key_column, value_column = _KEY_VALUE[table]
    row = tx.execute(f"SELECT {value_column} FROM {table} WHERE {key_column} = ?", (key,)).fetchone()
    return None if row is None else str(row[0])
