"""The device agent's store-and-forward state in one SQLite file (issue #5).

The agent keeps four things here, so a device that loses power or its network for days picks up
where it stopped:

* an **inbox** of received TASK envelopes (:meth:`put_task` recognises the broker's QoS 1
  re-deliveries, including of tasks already trained on);
* an **outbox** of encoded UPDATE / ERROR envelopes, each committed durably before the agent
  considers its task finished, sent oldest first with a per-send attempt number, and kept for
  ``retention_s`` after delivery so a re-delivered task is answered from the store;
* the **participation history** the device's budget is computed from;
* a few **facts** (JSON) such as the last eligibility decision.

Lifecycle: :meth:`DeviceStore.open` opens (creating or migrating the file), :meth:`close` closes;
the store is a context manager. The constructor does no I/O.

Threads: the agent calls from its main loop and from the transport's publish-ack callback
thread. The store holds one connection, opened with ``check_same_thread=False``, and serialises
every call with a lock. One connection instead of one per thread: calls last milliseconds, so
the lock costs nothing, while a second connection would contend for SQLite's file lock and turn
into ``SQLITE_BUSY`` retries; and the lock makes each method atomic without further thought.

Failure: every sqlite3 or OS error becomes a ``StorageError`` naming the file, ``StorageFull``
for a full disk (each write is one transaction, rolled back whole, so nothing committed earlier
is lost and the next write succeeds once space returns) and ``StoreCorrupt`` for a damaged file.
A corrupt file fails :meth:`open` by default (``on_corrupt="fail"``): a path pointing at the
wrong file looks exactly like corruption, and renaming someone's file is worse than refusing to
start. An unattended device should pass ``on_corrupt="move-aside"``: the file is renamed to
``<path>.corrupt-<UTC time>`` (kept for diagnosis, never deleted), logged, and an empty store
takes its place; the broker re-sends what the device has lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from edge_agent.errors import StorageError
from edge_agent.store import inbox, ledger, outbox
from edge_agent.store.config import OnCorrupt, StoreConfig, validate_on_corrupt
from edge_agent.store.connection import StoreCorrupt, check, connect, move_aside, translate
from edge_agent.store.records import InboxTask, OutboxItem, PurgeReport, StoreSizes, short_id

__all__ = ["DeviceStore"]

logger = logging.getLogger("fedflock.store")

Clock = Callable[[], float]


class DeviceStore:
    """Inbox, outbox, participation history and facts of one device, in one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock = time.time,
        config: StoreConfig | None = None,
        on_corrupt: OnCorrupt = "fail",
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._config = config if config is not None else StoreConfig()
        self._on_corrupt = validate_on_corrupt(on_corrupt)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        clock: Clock = time.time,
        config: StoreConfig | None = None,
        on_corrupt: OnCorrupt = "fail",
    ) -> DeviceStore:
        """Open the store at ``path``, creating the file or migrating its schema as needed.

        ``clock`` gives wall-clock seconds (creation, attempt, delivery and finish times); not a
        monotonic clock, because these times outlive the process and are compared with task
        deadlines, which are wall-clock too.

        Raises ``StoreCorrupt`` for a damaged file (unless ``on_corrupt="move-aside"``),
        ``StorageError`` for a file of a newer schema or not a device store at all, and
        ``ConfigError`` if the directory does not exist.
        """
        store = cls(path, clock=clock, config=config, on_corrupt=on_corrupt)
        store._connect()
        return store

    def _connect(self) -> None:
        with self._lock:
            if self._conn is not None:
                raise StorageError(f"device store {self._path} is already open")
            try:
                self._conn = connect(self._path, self._config)
            except StoreCorrupt as exc:
                if self._on_corrupt == "fail":
                    raise
                moved = move_aside(self._path, self._clock)
                logger.warning(
                    "device store %s was corrupt (%s); moved it to %s, starting empty", self._path, exc, moved
                )
                self._conn = connect(self._path, self._config)

    def close(self) -> None:
        """Close the connection (idempotent); the WAL is checkpointed into the main file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise translate(exc, self._path, "close the database") from exc

    def __enter__(self) -> DeviceStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    # -- inbox -------------------------------------------------------------------------------

    def put_task(self, task_id: str, round: int, envelope: bytes, received_at: float, expires_at: float) -> bool:
        """Store a received TASK; False for a duplicate (a re-delivery of a task already known).

        A task whose result is in the outbox is a duplicate too: answer it with
        :meth:`get_result` (and :meth:`requeue_result`) rather than training again.
        """
        with self._write("store the task") as conn:
            return inbox.insert_task(
                conn, task_id=task_id, round_=round, envelope=envelope, received_at=received_at, expires_at=expires_at
            )

    def pending_tasks(self, now: float) -> list[InboxTask]:
        """Tasks not yet finished whose deadline is after ``now``, oldest first."""
        with self._read("read the inbox") as conn:
            return inbox.pending_tasks(conn, now)

    def task_done(self, task_id: str) -> bool:
        """Finish a task that produced no result; False if unknown or finished already.

        :meth:`put_result` finishes its task itself, in the same transaction.
        """
        with self._write("finish the task") as conn:
            return inbox.finish_task(conn, task_id, self._clock())

    # -- outbox ------------------------------------------------------------------------------

    def put_result(self, task_id: str, round: int, envelope: bytes, expires_at: float) -> bool:
        """Commit a task's encoded UPDATE or ERROR envelope durably; False if it already had one.

        Idempotent: a second result for the same task is ignored (the first may already be on
        its way). The task is marked finished in the same transaction, so a crash can never
        leave both a pending task and its result, and once this returns the result survives
        power loss.

        When the outbox would exceed ``max_outbox_bytes`` the least useful results are evicted,
        each with a log line: delivered and expired ones, then the oldest pending. Refusing the
        new result instead would keep the device's oldest work and throw away its newest, but
        for a device offline for days the newest is the one most likely still wanted: its round
        is the most likely still open, and its update starts from the freshest global model.
        """
        size = len(envelope)
        if size > self._config.max_result_bytes:
            raise StorageError(
                f"result for task {short_id(task_id)} is {size} bytes, more than max_result_bytes "
                f"{self._config.max_result_bytes}"
            )
        now = self._clock()
        with self._write("store the result") as conn:
            if outbox.has_result(conn, task_id):
                return False
            evicted = outbox.evict_for(conn, size, self._config.max_outbox_bytes, now)
            outbox.insert_result(
                conn, task_id=task_id, round_=round, envelope=envelope, created_at=now, expires_at=expires_at
            )
            inbox.finish_task(conn, task_id, now)
        _log_drops(evicted)
        return True

    def next_to_send(self, now: float) -> OutboxItem | None:
        """The oldest undelivered result whose deadline is after ``now``, if any."""
        with self._read("read the outbox") as conn:
            return outbox.oldest_pending(conn, now)

    def get_result(self, task_id: str) -> OutboxItem | None:
        """The stored result of ``task_id`` (pending or delivered), if any."""
        with self._read("read the outbox") as conn:
            return outbox.get_result(conn, task_id)

    def begin_attempt(self, task_id: str) -> int:
        """Count a send of ``task_id``'s result and return its attempt number (1 for the first).

        Put it in the UPDATE's ``attempt`` field: every send, across restarts, carries a new
        idempotency key, and the broker still counts the task once. Committed before the send,
        so a crash between the two burns a number rather than reusing one.
        """
        with self._write("count the send attempt") as conn:
            attempt = outbox.next_attempt(conn, task_id, self._clock())
        if attempt is None:
            raise StorageError(f"device store {self._path}: no result for task {task_id!r} in the outbox")
        return attempt

    def mark_delivered(self, task_id: str) -> bool:
        """Record the broker's acknowledgement; False if the result is unknown or already delivered.

        The result is kept ``retention_s`` longer, then :meth:`purge` forgets it. Safe to call from
        the transport's ack callback thread, also after :meth:`drop_result` removed the result.
        """
        with self._write("mark the result delivered") as conn:
            return outbox.deliver(conn, task_id, self._clock())

    def requeue_result(self, task_id: str) -> bool:
        """Make a delivered result pending again (the broker re-delivered its task); False if not delivered."""
        with self._write("requeue the result") as conn:
            return outbox.requeue(conn, task_id)

    def drop_result(self, task_id: str, reason: str) -> bool:
        """Remove a result the server no longer wants, logging ``reason``; False if there was none."""
        with self._write("drop the result") as conn:
            line = outbox.remove_result(conn, task_id, reason)
        if line is None:
            return False
        _log_drops([line])
        return True

    # -- housekeeping --------------------------------------------------------------------------

    def purge(self, now: float) -> PurgeReport:
        """Remove what expired or outlived ``retention_s`` by ``now``; free pages go back to the disk.

        Unfinished tasks and undelivered results past their deadline are logged, one line each;
        delivered results, finished-task markers and history past retention go quietly (they did
        their job). Call it at start-up and periodically, e.g. once per agent loop.
        """
        before = now - self._config.retention_s
        with self._write("purge old entries") as conn:
            tasks = inbox.expire_tasks(conn, now)
            results = outbox.expire_results(conn, now)
            report = PurgeReport(
                expired_tasks=len(tasks),
                expired_results=len(results),
                delivered_results=outbox.purge_delivered(conn, before),
                finished_tasks=inbox.purge_finished_tasks(conn, before),
                participations=ledger.purge_participations(conn, before),
            )
        _log_drops(tasks + results)
        if report.total:
            self._vacuum()
        return report

    def _vacuum(self) -> None:
        with self._lock:
            conn = self._require_open()
            try:
                conn.executescript("PRAGMA incremental_vacuum")  # execute() would free a single page
            except sqlite3.Error as exc:
                raise translate(exc, self._path, "return free pages to the disk") from exc

    def sizes(self) -> StoreSizes:
        """Counts of pending tasks, pending and delivered results, and bytes used."""
        with self._read("count entries") as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM tasks WHERE done_at IS NULL),"
                " (SELECT count(*) FROM results WHERE delivered_at IS NULL),"
                " (SELECT count(*) FROM results WHERE delivered_at IS NOT NULL),"
                " (SELECT coalesce(sum(size), 0) FROM results)"
            ).fetchone()
            page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return StoreSizes(
            pending_tasks=row[0],
            pending_results=row[1],
            delivered_results=row[2],
            bytes=page_count * page_size,
            outbox_bytes=row[3],
        )

    def verify(self) -> None:
        """Run a full ``PRAGMA integrity_check``; raises ``StoreCorrupt`` if it finds anything."""
        with self._read("check the database") as conn:
            check(conn, self._path, "integrity_check")

    # -- participation history and facts -------------------------------------------------------

    def record_participation(self, task_id: str, at: float) -> bool:
        """Record that the device trained for ``task_id`` at ``at``; False if already recorded."""
        with self._write("record the participation") as conn:
            return ledger.insert_participation(conn, task_id, at)

    def participations(self, since: float) -> list[float]:
        """Times of the participations at or after ``since``, ascending."""
        with self._read("read the participation history") as conn:
            return ledger.participations_since(conn, since)

    def put_fact(self, key: str, json_text: str) -> None:
        """Store ``json_text`` under ``key``, replacing any earlier value; it must be valid JSON."""
        try:
            json.loads(json_text)
        except ValueError as exc:
            raise ValueError(f"fact {key!r} is not valid JSON: {exc}") from exc
        with self._write("store the fact") as conn:
            ledger.upsert_fact(conn, key, json_text, self._clock())

    def get_fact(self, key: str) -> str | None:
        """The JSON text stored under ``key``, None if there is none."""
        with self._read("read the fact") as conn:
            return ledger.get_fact(conn, key)

    # -- plumbing ------------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"device store {self._path} is not open")
        return self._conn

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock, rolled back whole on any error."""
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise translate(exc, self._path, action) from exc
            except BaseException:
                self._rollback(conn)
                raise

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require_open()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise translate(exc, self._path, action) from exc

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:  # SQLite already rolled back (it does on SQLITE_FULL)
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception(
                "device store %s: rollback failed; SQLite rolls back when the connection closes", self._path
            )


def _log_drops(lines: list[str]) -> None:
    for line in lines:
        logger.warning(line)
