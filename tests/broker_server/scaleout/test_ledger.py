"""The scale-out tables against a real PostgreSQL: each result counted by exactly one worker."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from broker_server.persistence import PostgresServerStore, StoreConflict
from broker_server.persistence.records import AggregateCheckpoint
from broker_server.persistence.scaleout import ScaleoutLedger, WorkerFenced
from tests.broker_server.scaleout.conftest import TASKS, Clock, seed_round

Opener = Callable[[], PostgresServerStore]


def partial(tasks: list[str], scale: float = 1.0) -> AggregateCheckpoint:
    return AggregateCheckpoint(
        sums={"w": np.full((2, 3), scale * len(tasks))},
        total_weight=10.0 * len(tasks),
        count=len(tasks),
        accepted=frozenset(tasks),
        metric_sums={"loss": 0.5 * len(tasks)},
    )


def test_concurrent_workers_claim_each_task_exactly_once(open_store: Opener) -> None:
    seed_round(open_store())
    ledgers = [ScaleoutLedger(open_store(), clock=Clock()) for _ in range(4)]
    ledgers[0].open_round(1)
    sessions = [ledger.register_worker(f"w{i}") for i, ledger in enumerate(ledgers)]
    start, wins = threading.Barrier(4), dict[str, list[str]]()
    lock = threading.Lock()

    def claim_all(i: int) -> None:
        start.wait()
        for task_id in TASKS:  # every worker tries every task, all at once
            with ledgers[i].claim(1, task_id, sessions[i], outcome="accepted", key=f"k{i}", weight=3.0) as got:
                if got == "won":
                    with lock:
                        wins.setdefault(task_id, []).append(sessions[i])

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(wins) == sorted(TASKS) and all(len(owners) == 1 for owners in wins.values()), wins
    claims = ledgers[0].claims(1)
    assert {t: c.session for t, c in claims.items()} == {t: owners[0] for t, owners in wins.items()}
    assert ledgers[1].counts(1) == (4, 0, 4)


def test_a_fold_that_raises_rolls_its_claim_back(open_store: Opener) -> None:
    seed_round(open_store())
    ledger = ScaleoutLedger(open_store(), clock=Clock())
    ledger.open_round(1)
    session = ledger.register_worker("w")
    claim = ledger.claim(1, "t1", session, outcome="accepted", key="k", weight=1.0)
    with pytest.raises(ValueError, match="bad payload"), claim as got:
        assert got == "won"
        raise ValueError("bad payload")
    assert ledger.claims(1) == {}
    other = ScaleoutLedger(open_store(), clock=Clock())
    with other.claim(1, "t1", other.register_worker("v"), outcome="accepted", key="k2", weight=1.0) as got:
        assert got == "won"  # the honest re-send is counted


def test_no_claim_once_the_round_closes_and_flushes_must_match_claims(open_store: Opener) -> None:
    seed_round(open_store())
    ledger = ScaleoutLedger(open_store(), clock=Clock())
    ledger.open_round(1)
    session = ledger.register_worker("w")
    for task_id in ("t1", "t2"):
        with ledger.claim(1, task_id, session, outcome="accepted", key=task_id, weight=1.0) as got:
            assert got == "won"
    with ledger.claim(1, "t3", session, outcome="failed", key="t3/error", weight=0.0, reason="oom") as got:
        assert got == "won"
    with pytest.raises(StoreConflict, match="not folded"):
        ledger.flush(1, session, partial(["t1"]))  # would lose t2
    with pytest.raises(StoreConflict, match="unclaimed"):
        ledger.flush(1, session, partial(["t1", "t2", "t4"]))  # would count an unclaimed t4
    assert ledger.counts(1) == (2, 1, 2)
    ledger.close(1)
    assert ledger.heartbeat(session) == frozenset({1})
    with ledger.claim(1, "t4", session, outcome="accepted", key="t4", weight=1.0) as got:
        assert got == "closed"
    ledger.flush(1, session, partial(["t1", "t2"]))
    assert ledger.counts(1) == (2, 1, 0)
    [row] = ledger.partials(1)
    assert row.session == session and row.checkpoint.accepted == {"t1", "t2"} and row.flushes == 1
    np.testing.assert_array_equal(row.checkpoint.sums["w"], np.full((2, 3), 2.0))


def test_a_fenced_worker_loses_only_its_unflushed_claims_and_can_do_nothing_more(open_store: Opener) -> None:
    seed_round(open_store())
    coordinator = ScaleoutLedger(open_store(), clock=Clock())
    coordinator.open_round(1)
    worker = ScaleoutLedger(open_store(), clock=Clock())
    session = worker.register_worker("w")
    for task_id in ("t1", "t2"):
        with worker.claim(1, task_id, session, outcome="accepted", key=task_id, weight=1.0):
            pass
    worker.flush(1, session, partial(["t1", "t2"]))
    with worker.claim(1, "t3", session, outcome="accepted", key="t3", weight=1.0):
        pass  # claimed, never flushed: the worker "dies" here
    assert coordinator.fence(session) == {1: ["t3"]}
    assert sorted(coordinator.claims(1)) == ["t1", "t2"]  # the flushed ones are durable
    with pytest.raises(WorkerFenced):
        worker.heartbeat(session)
    with pytest.raises(WorkerFenced):
        worker.flush(1, session, partial(["t1", "t2", "t3"]))
    with pytest.raises(WorkerFenced), worker.claim(1, "t4", session, outcome="accepted", key="t4", weight=1.0):
        pass
    other = ScaleoutLedger(open_store(), clock=Clock())
    with other.claim(1, "t3", other.register_worker("v"), outcome="accepted", key="t3/2", weight=1.0) as got:
        assert got == "won"  # the re-sent TASK's stored result, counted by another worker
    [row] = coordinator.partials(1)
    assert row.checkpoint.accepted == {"t1", "t2"}


def test_settle_records_the_round_as_a_single_server_would(open_store: Opener) -> None:
    store = open_store()
    seed_round(store)
    ledger = ScaleoutLedger(store, clock=Clock())
    ledger.open_round(1)
    a, b = ledger.register_worker("a"), ledger.register_worker("b")
    for session, task_id in ((a, "t1"), (b, "t2"), (a, "t3")):
        with ledger.claim(1, task_id, session, outcome="accepted", key=f"d/{task_id}/1", weight=1.0):
            pass
    with ledger.claim(1, "t4", b, outcome="failed", key="d4/t4/error", weight=0.0, reason="oom: no memory"):
        pass
    ledger.flush(1, a, partial(["t1", "t3"]))
    ledger.flush(1, b, partial(["t2"]))
    combined = AggregateCheckpoint(
        sums={"w": np.full((2, 3), 3.0)}, total_weight=30.0, count=3, accepted=frozenset({"t1", "t2", "t3"})
    )
    ledger.close(1)
    ledger.settle(1, combined, ledger.claims(1))
    snapshot = store.load_round(1)
    assert snapshot.accepted == {"t1", "t2", "t3"} and snapshot.failed == {"t4": "oom: no memory"}
    assert snapshot.checkpoint.count == 3 and snapshot.checkpoint.total_weight == 30.0
    assert {t.task_id: t.key for t in snapshot.tasks}["t2"] == "d/t2/1"
    assert [(d.device_id, d.accepted, d.failed) for d in store.devices()] == [
        ("d1", 1, 0),
        ("d2", 1, 0),
        ("d3", 1, 0),
        ("d4", 0, 1),
    ]
    with pytest.raises(StoreConflict):
        ledger.settle(1, combined, ledger.claims(1))  # never twice
