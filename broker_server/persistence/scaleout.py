"""The scale-out tables (schema v3): which worker counted which result, and the workers' partials.

:class:`ScaleoutLedger` runs on the server store of a federation whose results are shared by
several worker processes (docs/scaleout.md). Every call is one transaction on the store's
connection (:meth:`SqlServerStore.transaction`); two ledgers in two processes share one database.

**Exactly once.** ``scaleout_claims`` has the primary key ``(round, task_id)``. A worker counts a
result only inside :meth:`ScaleoutLedger.claim`: the transaction inserts the claim (``ON CONFLICT
DO NOTHING``), and only the worker whose insert won folds the update — while the transaction is
still open, so a fold that raises (a bad payload) rolls the claim back. A copy delivered to
another worker finds the row and is a duplicate.

**Locks** (PostgreSQL; SQLite serialises every writer anyway). A claim takes a shared lock on the
round's ``scaleout_rounds`` row and on the worker's ``scaleout_workers`` row, so claims of many
workers run concurrently, while :meth:`close` (exclusive lock on the round row) waits for claims
in flight and refuses later ones, and :meth:`fence` (exclusive lock on the worker row) waits for
the worker's claim or flush in flight and refuses its later ones. Lock order everywhere: round
row, then worker row, then claims and partials, so no two of these transactions deadlock.

**Partials.** :meth:`flush` upserts the worker's cumulative partial of a round (float64 sums,
weight, count, metric sums, task ids) and marks exactly those claims flushed, in one
transaction, after checking that the partial covers exactly the worker's accepted claims of the
round (a partial that would lose or double an update is refused). :meth:`fence` marks a worker
dead and deletes its *unflushed* accepted claims, returning them: their updates are in no
durable partial, so the coordinator re-sends their TASKs (agents answer a known task id with
their stored result) and another worker counts them.

The tables exist in SQLite too (one migration for both backends), but scale-out needs several
processes on several hosts to share them: ``fedflock broker --role`` refuses a SQLite store.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np

from broker_server.persistence import queries
from broker_server.persistence.errors import RecordNotFound, StorageError, StoreConflict
from broker_server.persistence.records import AggregateCheckpoint
from broker_server.persistence.schema import Tx
from broker_server.persistence.sql import Clock, SqlServerStore
from edge_agent.protocol.tensors import encode_tensors

__all__ = [
    "ClaimResult",
    "ClaimRow",
    "ClaimTally",
    "PartialRow",
    "ScaleoutLedger",
    "WorkerFenced",
    "WorkerRow",
]

ClaimResult = Literal["won", "duplicate", "closed"]
Outcome = Literal["accepted", "failed"]


class WorkerFenced(StoreConflict):
    """The worker session was declared dead by the coordinator: it must stop (its unflushed
    updates are being collected again by other workers)."""

    code = "worker_fenced"


@dataclass(frozen=True, kw_only=True)
class ClaimRow:
    task_id: str
    session: str
    outcome: Outcome
    key: str
    weight: float
    reason: str
    flushed: bool


@dataclass(frozen=True, kw_only=True)
class ClaimTally:
    """How many claims of one round one worker session holds, by outcome and flushed or not."""

    session: str
    outcome: Outcome
    flushed: bool
    count: int


@dataclass(frozen=True, kw_only=True, eq=False)
class PartialRow:
    """One worker session's flushed partial aggregate of one round."""

    session: str
    checkpoint: AggregateCheckpoint
    flushes: int


@dataclass(frozen=True, kw_only=True)
class WorkerRow:
    session: str
    worker_id: str
    status: str
    beats: int


def _share(tx: Tx) -> str:
    # a shared row lock on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers
    return " FOR SHARE" if tx.dialect.name == "postgresql" else ""


class ScaleoutLedger:
    """The scale-out tables of one server store (the store's owner opens and closes it)."""

    def __init__(self, store: SqlServerStore, *, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    # -- workers -------------------------------------------------------------------------------

    def register_worker(self, worker_id: str) -> str:
        """A new session for ``worker_id`` (a restarted worker is a new session); returns its id."""
        session = f"{worker_id}-{uuid.uuid4().hex[:12]}"
        now = self._clock()
        with self._store.transaction(f"register worker {worker_id!r}", write=True) as tx:
            tx.execute(
                "INSERT INTO scaleout_workers (session, worker_id, status, beats, started_at, updated_at)"
                " VALUES (?, ?, 'alive', 0, ?, ?)",
                (session, worker_id, now, now),
            )
        return session

    def heartbeat(self, session: str) -> frozenset[int]:
        """Count a beat; returns the rounds now closing (``WorkerFenced`` if the session was fenced)."""
        with self._store.transaction(f"heartbeat of {session}", write=True) as tx:
            self._require_alive(tx, session, lock=False)
            tx.execute(
                "UPDATE scaleout_workers SET beats = beats + 1, updated_at = ? WHERE session = ?",
                (self._clock(), session),
            )
            rows = tx.execute("SELECT round FROM scaleout_rounds WHERE status = 'closing'").fetchall()
        return frozenset(int(r[0]) for r in rows)

    def stop_worker(self, session: str) -> None:
        """A clean stop: the session is no longer counted on (its flushed partials stay)."""
        with self._store.transaction(f"stop {session}", write=True) as tx:
            tx.execute(
                "UPDATE scaleout_workers SET status = 'stopped', updated_at = ? WHERE session = ? AND status = 'alive'",
                (self._clock(), session),
            )

    def workers(self) -> list[WorkerRow]:
        with self._store.transaction("list the workers", write=False) as tx:
            rows = tx.execute("SELECT session, worker_id, status, beats FROM scaleout_workers ORDER BY session")
            return [WorkerRow(session=r[0], worker_id=r[1], status=r[2], beats=int(r[3])) for r in rows.fetchall()]

    def fence(self, session: str) -> dict[int, list[str]]:
        """Declare ``session`` dead; delete its unflushed accepted claims and return them by round."""
        with self._store.transaction(f"fence {session}", write=True) as tx:
            row = tx.execute(
                f"SELECT status FROM scaleout_workers WHERE session = ?{tx.dialect.for_update}", (session,)
            ).fetchone()
            if row is None:
                raise RecordNotFound(f"no worker session {session!r}")
            tx.execute(
                "UPDATE scaleout_workers SET status = 'fenced', updated_at = ? WHERE session = ?",
                (self._clock(), session),
            )
            rows = tx.execute(
                "SELECT round, task_id FROM scaleout_claims WHERE session = ? AND flushed = 0 AND outcome = 'accepted'",
                (session,),
            ).fetchall()
            tx.execute(
                "DELETE FROM scaleout_claims WHERE session = ? AND flushed = 0 AND outcome = 'accepted'", (session,)
            )
        released: dict[int, list[str]] = {}
        for round_, task_id in rows:
            released.setdefault(int(round_), []).append(str(task_id))
        return {r: sorted(tasks) for r, tasks in released.items()}

    # -- rounds --------------------------------------------------------------------------------

    def open_round(self, round_: int) -> None:
        """Start collecting round ``round_`` (already created in the store with its tasks)."""
        with self._store.transaction(f"open round {round_} to the workers", write=True) as tx:
            tx.execute(
                "INSERT INTO scaleout_rounds (round, status, updated_at) VALUES (?, 'collecting', ?)",
                (round_, self._clock()),
            )

    def round_status(self, round_: int) -> str | None:
        with self._store.transaction(f"read the status of round {round_}", write=False) as tx:
            row = tx.execute("SELECT status FROM scaleout_rounds WHERE round = ?", (round_,)).fetchone()
        return None if row is None else str(row[0])

    def unfinished_rounds(self) -> list[int]:
        """Rounds still collecting or closing, in order."""
        with self._store.transaction("list the unfinished scale-out rounds", write=False) as tx:
            rows = tx.execute(
                "SELECT round FROM scaleout_rounds WHERE status IN ('collecting', 'closing') ORDER BY round"
            ).fetchall()
        return [int(r[0]) for r in rows]

    def close(self, round_: int) -> None:
        """No claim for ``round_`` is accepted after this returns (claims in flight finish first)."""
        self._set_status(round_, "closing", {"collecting"})

    def closed(self, round_: int) -> None:
        self._set_status(round_, "closed", {"collecting", "closing"})

    def _set_status(self, round_: int, status: str, allowed: set[str]) -> None:
        with self._store.transaction(f"mark round {round_} {status}", write=True) as tx:
            row = tx.execute(
                f"SELECT status FROM scaleout_rounds WHERE round = ?{tx.dialect.for_update}", (round_,)
            ).fetchone()
            if row is None or row[0] not in allowed:
                raise StoreConflict(f"round {round_} is {row[0] if row else 'not a scale-out round'}, not {allowed}")
            tx.execute(
                "UPDATE scaleout_rounds SET status = ?, updated_at = ? WHERE round = ?", (status, self._clock(), round_)
            )

    # -- claims --------------------------------------------------------------------------------

    @contextmanager
    def claim(
        self, round_: int, task_id: str, session: str, *, outcome: Outcome, key: str, weight: float, reason: str = ""
    ) -> Iterator[ClaimResult]:
        """Claim the result of ``task_id``; the body runs inside the transaction (fold only on "won").

        "duplicate": another claim exists (nothing changes); "closed": the round no longer
        collects. An exception in the body rolls the claim back. ``WorkerFenced`` if the session
        is dead. A failure (``outcome="failed"``) is flushed at once: it adds nothing to a partial.
        """
        with self._store.transaction(f"claim task {task_id!r} of round {round_}", write=True) as tx:
            row = tx.execute(f"SELECT status FROM scaleout_rounds WHERE round = ?{_share(tx)}", (round_,)).fetchone()
            self._require_alive(tx, session, lock=True)
            if row is None or row[0] != "collecting":
                yield "closed"
                return
            cursor = tx.execute(
                "INSERT INTO scaleout_claims (round, task_id, session, outcome, result_key, weight, reason, flushed,"
                " claimed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round, task_id) DO NOTHING",
                (round_, task_id, session, outcome, key, weight, reason, int(outcome == "failed"), self._clock()),
            )
            yield "won" if cursor.rowcount == 1 else "duplicate"

    def claims(self, round_: int) -> dict[str, ClaimRow]:
        with self._store.transaction(f"read the claims of round {round_}", write=False) as tx:
            rows = tx.execute(
                "SELECT task_id, session, outcome, result_key, weight, reason, flushed FROM scaleout_claims"
                " WHERE round = ?",
                (round_,),
            ).fetchall()
        return {
            str(r[0]): ClaimRow(
                task_id=str(r[0]),
                session=str(r[1]),
                outcome=r[2],
                key=str(r[3]),
                weight=float(r[4]),
                reason=str(r[5]),
                flushed=bool(r[6]),
            )
            for r in rows
        }

    def counts(self, round_: int) -> tuple[int, int, int]:
        """``(accepted, failed, unflushed)`` claims of ``round_``."""
        with self._store.transaction(f"count the claims of round {round_}", write=False) as tx:
            row = tx.execute(
                "SELECT coalesce(sum(CASE WHEN outcome = 'accepted' THEN 1 ELSE 0 END), 0),"
                " coalesce(sum(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END), 0),"
                " coalesce(sum(CASE WHEN flushed = 0 THEN 1 ELSE 0 END), 0) FROM scaleout_claims WHERE round = ?",
                (round_,),
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def tally(self, round_: int) -> list[ClaimTally]:
        """The claims of ``round_`` counted by session, outcome and flushed (the coordinator's
        counting rule, :func:`broker_server.scaleout.liveness.count_claims`, needs the session)."""
        with self._store.transaction(f"tally the claims of round {round_}", write=False) as tx:
            rows = tx.execute(
                "SELECT session, outcome, flushed, count(*) FROM scaleout_claims WHERE round = ?"
                " GROUP BY session, outcome, flushed ORDER BY session, outcome, flushed",
                (round_,),
            ).fetchall()
        return [ClaimTally(session=str(r[0]), outcome=r[1], flushed=bool(r[2]), count=int(r[3])) for r in rows]

    # -- partials ------------------------------------------------------------------------------

    def flush(self, round_: int, session: str, partial: AggregateCheckpoint) -> None:
        """Store ``session``'s cumulative partial of ``round_``; it must cover exactly its accepted claims."""
        sums = _encode_sums(partial.sums, round_)
        task_ids = json.dumps(sorted(partial.accepted))
        metric_sums = queries.dumps(dict(partial.metric_sums))
        with self._store.transaction(f"flush the partial of {session} for round {round_}", write=True) as tx:
            self._require_alive(tx, session, lock=True)
            rows = tx.execute(
                "SELECT task_id FROM scaleout_claims WHERE round = ? AND session = ? AND outcome = 'accepted'",
                (round_, session),
            ).fetchall()
            claimed = frozenset(str(r[0]) for r in rows)
            if claimed != partial.accepted:
                extra, missing = sorted(partial.accepted - claimed), sorted(claimed - partial.accepted)
                raise StoreConflict(
                    f"round {round_}: the partial of {session} is not its claims (unclaimed: {extra[:3]}, "
                    f"not folded: {missing[:3]}); it would count an update twice or lose one"
                )
            tx.execute(
                "INSERT INTO scaleout_partials (round, session, sums, total_weight, update_count, metric_sums,"
                " task_ids, flushes, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT (round, session)"
                " DO UPDATE SET sums = excluded.sums, total_weight = excluded.total_weight,"
                " update_count = excluded.update_count, metric_sums = excluded.metric_sums,"
                " task_ids = excluded.task_ids, flushes = scaleout_partials.flushes + 1,"
                " updated_at = excluded.updated_at",
                (round_, session, sums, partial.total_weight, partial.count, metric_sums, task_ids, self._clock()),
            )
            tx.execute(
                "UPDATE scaleout_claims SET flushed = 1 WHERE round = ? AND session = ? AND outcome = 'accepted'",
                (round_, session),
            )

    def partials(self, round_: int) -> list[PartialRow]:
        """Every flushed partial of ``round_``, by session."""
        with self._store.transaction(f"read the partials of round {round_}", write=False) as tx:
            rows = tx.execute(
                "SELECT session, sums, total_weight, update_count, metric_sums, task_ids, flushes"
                " FROM scaleout_partials WHERE round = ? ORDER BY session",
                (round_,),
            ).fetchall()
            return [_partial_row(round_, r) for r in rows]

    # -- settling ------------------------------------------------------------------------------

    def settle(self, round_: int, checkpoint: AggregateCheckpoint, claims: Mapping[str, ClaimRow]) -> None:
        """Record the combined round in the store's own tables, as a single server would have:
        tasks accepted or failed with their result keys, participation counted, the checkpoint
        stored (the round itself is then completed or abandoned through the journal)."""
        sums = _encode_sums(checkpoint.sums, round_)
        now = self._clock()
        with self._store.transaction(f"settle round {round_}", write=True) as tx:
            if not queries.lock_round(tx, round_):
                raise StoreConflict(f"round {round_} is already closed")
            for task_id, claim in sorted(claims.items(), key=lambda item: item[0]):
                device = queries.claim_task(
                    tx, round_, task_id, claim.key, claim.outcome, claim.reason, now, round_open=True
                )
                if device is None:
                    raise StoreConflict(f"round {round_}: task {task_id!r} already has a result in round_tasks")
                queries.count_participation(tx, device, f"{claim.outcome}_count")
            queries.write_aggregate(tx, round_, checkpoint, sums, now)

    def _require_alive(self, tx: Tx, session: str, *, lock: bool) -> None:
        row = tx.execute(
            f"SELECT status FROM scaleout_workers WHERE session = ?{_share(tx) if lock else ''}", (session,)
        ).fetchone()
        if row is None:
            raise RecordNotFound(f"no worker session {session!r}")
        if row[0] != "alive":
            raise WorkerFenced(f"worker session {session} is {row[0]}; its unflushed updates were released")


def _encode_sums(sums: Mapping[str, np.ndarray], round_: int) -> bytes:
    try:
        return encode_tensors({name: np.asarray(value, dtype=np.float64) for name, value in sums.items()})
    except (TypeError, ValueError) as exc:
        raise StorageError(f"cannot store the partial of round {round_}: {exc}") from exc


def _partial_row(round_: int, row: tuple[object, ...]) -> PartialRow:
    session = str(row[0])
    blob = row[1]
    sums = {} if blob is None else queries.decode(blob, f"partial of {session} in round {round_}")  # type: ignore[arg-type]
    task_ids = frozenset(str(t) for t in json.loads(str(row[5])))
    checkpoint = AggregateCheckpoint(
        sums=sums,
        total_weight=float(row[2]),  # type: ignore[arg-type]
        count=int(row[3]),  # type: ignore[call-overload]
        accepted=task_ids,
        metric_sums={str(k): float(v) for k, v in json.loads(str(row[4])).items()},
    )
    return PartialRow(session=session, checkpoint=checkpoint, flushes=int(row[6]))  # type: ignore[call-overload]
