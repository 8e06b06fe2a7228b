"""The coordinator's counting rule: only claims that will be in a partial count towards a round's
outcome. The claims live in a real PostgreSQL; the beat counters are the ledger's own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker_server.persistence import PostgresServerStore
from broker_server.persistence.scaleout import Outcome, ScaleoutLedger, WorkerRow
from broker_server.scaleout import ScaleoutSettings
from broker_server.scaleout.liveness import BeatWatch, RoundCounts, count_claims
from broker_server.selection import Complete, Wait, round_outcome
from tests.broker_server.scaleout.conftest import TASKS, Clock, seed_round
from tests.broker_server.scaleout.test_ledger import partial

Opener = Callable[[], PostgresServerStore]


def claim(ledger: ScaleoutLedger, session: str, task_id: str, *, failed: bool = False) -> None:
    outcome: Outcome = "failed" if failed else "accepted"
    with ledger.claim(1, task_id, session, outcome=outcome, key=f"{task_id}/1", weight=1.0) as got:
        assert got == "won"


def test_unflushed_claims_count_only_while_their_worker_beats(open_store: Opener) -> None:
    seed_round(open_store())
    ledger = ScaleoutLedger(open_store(), clock=Clock())
    ledger.open_round(1)
    a, b, c = (ledger.register_worker(name) for name in "abc")
    claim(ledger, a, "t1")
    ledger.flush(1, a, partial(["t1"]))
    claim(ledger, a, "t2")  # A's second claim is not flushed yet
    claim(ledger, b, "t3")  # nor is B's
    claim(ledger, c, "t4", failed=True)  # a failure is durable at once
    tally = ledger.tally(1)
    assert sum(row.count for row in tally) == 4
    assert count_claims(tally, {a, b, c}) == RoundCounts(accepted=3, failed=1, pending=0, stopped=frozenset())
    assert count_claims(tally, {b}) == RoundCounts(accepted=2, failed=1, pending=1, stopped=frozenset({a}))
    assert count_claims(tally, set()) == RoundCounts(accepted=1, failed=1, pending=2, stopped=frozenset({a, b}))
    ledger.flush(1, b, partial(["t3"]))
    assert count_claims(ledger.tally(1), set()) == RoundCounts(accepted=2, failed=1, pending=1, stopped=frozenset({a}))
    assert ledger.fence(a) == {1: ["t2"]}  # fenced: the pending claim is gone, its task outstanding again
    assert count_claims(ledger.tally(1), set()) == RoundCounts(accepted=2, failed=1, pending=0, stopped=frozenset())


def test_a_round_does_not_complete_on_the_claims_of_a_worker_that_stopped_beating(open_store: Opener) -> None:
    """The scenario of the old known limit: the dead worker's unflushed claims would have made
    the round complete; now the round waits for the fence, then for the re-sent tasks."""
    seed_round(open_store())
    settings = ScaleoutSettings(heartbeat_s=0.2, poll_s=0.1, lease_s=10.0)
    coordinator = ScaleoutLedger(open_store(), clock=Clock())
    coordinator.open_round(1)
    worker_a, worker_b = ScaleoutLedger(open_store(), clock=Clock()), ScaleoutLedger(open_store(), clock=Clock())
    a, b = worker_a.register_worker("a"), worker_b.register_worker("b")
    watch, now = BeatWatch(beat_window_s=settings.beat_window_s, lease_s=settings.lease_s), 0.0

    def poll(dt: float, *beating: ScaleoutLedger) -> object:
        nonlocal now
        now += dt
        for ledger, session in ((worker_a, a), (worker_b, b)):
            if ledger in beating:
                ledger.heartbeat(session)
        for session in watch.observe(coordinator.workers(), now):
            coordinator.fence(session)
        counts = count_claims(coordinator.tally(1), watch.beating)
        outcome = round_outcome(
            counts.accepted,
            wanted=4,
            min_reports=4,
            outstanding=len(TASKS) - counts.accepted - counts.failed,
            deadline_passed=False,
        )
        assert not isinstance(outcome, Complete) or counts.pending == 0
        return outcome

    assert poll(0.1) == Wait() and watch.beating == frozenset()  # first seen: not beating yet
    assert poll(0.1, worker_a, worker_b) == Wait() and watch.beating == {a, b}
    claim(worker_a, a, "t1")
    claim(worker_a, a, "t2")  # A claims two updates, flushes none, and dies
    assert poll(1.0, worker_b) == Wait() and watch.beating == {b}  # A missed 3 beats and more
    claim(worker_b, b, "t3")
    claim(worker_b, b, "t4")
    assert len(coordinator.claims(1)) == 4
    assert poll(0.1, worker_b) == Wait()  # 4 claims, but 2 of them will never be in a partial
    for _ in range(int(settings.lease_s / 0.5)):
        assert poll(0.5, worker_b) == Wait()
    assert [w.status for w in coordinator.workers() if w.session == a] == ["fenced"]
    assert sorted(coordinator.claims(1)) == ["t3", "t4"]  # A's claims deleted; their TASKs are re-sent
    claim(worker_b, b, "t1")
    claim(worker_b, b, "t2")
    assert poll(0.1, worker_b) == Complete(reports=4, early=False)


def test_beat_watch_windows() -> None:
    def rows(**beats: int) -> list[WorkerRow]:
        return [WorkerRow(session=s, worker_id=s, status="alive", beats=n) for s, n in beats.items()]

    watch = BeatWatch(beat_window_s=0.7, lease_s=5.0)
    assert watch.observe(rows(a=3), 0.0) == [] and watch.beating == frozenset()
    assert watch.observe(rows(a=4), 0.2) == [] and watch.beating == {"a"}
    assert watch.observe(rows(a=4), 0.9) == [] and watch.beating == {"a"}
    assert watch.observe(rows(a=4), 1.0) == [] and watch.beating == frozenset()  # 3 beats missed: not counted
    assert watch.observe(rows(a=5), 1.1) == [] and watch.beating == {"a"}  # it was only slow
    assert watch.observe(rows(a=5), 6.2) == ["a"]  # the lease ran out: fence it
    gone = [WorkerRow(session="a", worker_id="a", status="fenced", beats=5)]
    assert watch.observe(gone, 6.3) == [] and watch.beating == frozenset()
    with pytest.raises(ValueError, match="beat_window_s"):
        BeatWatch(beat_window_s=6.0, lease_s=5.0)


def test_the_beat_window_is_a_few_heartbeats_and_never_longer_than_the_lease() -> None:
    assert ScaleoutSettings(heartbeat_s=0.2, poll_s=0.1, lease_s=10.0).beat_window_s == pytest.approx(0.7)
    assert ScaleoutSettings(heartbeat_s=1.0, poll_s=0.1, lease_s=2.5).beat_window_s == 2.5
