"""The inbox: QoS 1 re-deliveries, pending order, deadlines and their log lines."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import DeviceStore, StoreConfig
from tests.edge_agent.store import DAY, HOUR, T0, Clock, open_store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[DeviceStore]:
    with open_store(tmp_path, clock) as store:
        yield store


def put(store: DeviceStore, task_id: str, *, round_: int = 1, received: float = T0, ttl: float = HOUR) -> bool:
    return store.put_task(task_id, round_, f"TASK {task_id}".encode(), received, received + ttl)


def test_put_task_stores_the_envelope_and_refuses_a_redelivery(store: DeviceStore) -> None:
    assert put(store, "r1-a", round_=1) is True
    assert store.put_task("r1-a", 1, b"a re-delivered copy", T0 + 5, T0 + HOUR) is False

    [task] = store.pending_tasks(T0)
    assert (task.task_id, task.round, task.envelope) == ("r1-a", 1, b"TASK r1-a")
    assert (task.received_at, task.expires_at) == (T0, T0 + HOUR)


def test_pending_tasks_come_in_arrival_order_whatever_the_clock_says(store: DeviceStore) -> None:
    # a device without an RTC may step its clock back at NTP sync: arrival order must survive that
    put(store, "first", received=T0 + 100)
    put(store, "second", received=T0)
    put(store, "third", received=T0 + 50)

    assert [t.task_id for t in store.pending_tasks(T0 + 200)] == ["first", "second", "third"]


def test_pending_tasks_leave_out_finished_and_expired_ones(store: DeviceStore) -> None:
    put(store, "done")
    put(store, "late", ttl=60)
    put(store, "live", ttl=HOUR)

    assert store.task_done("done") is True
    assert store.task_done("done") is False
    assert store.task_done("unknown") is False
    assert [t.task_id for t in store.pending_tasks(T0 + 61)] == ["live"]
    assert store.sizes().pending_tasks == 2  # "late" stays until purge removes it, logged


def test_a_finished_task_redelivered_is_still_a_duplicate(store: DeviceStore) -> None:
    put(store, "r2-x")
    store.task_done("r2-x")

    assert put(store, "r2-x") is False
    assert store.pending_tasks(T0) == []


def test_a_task_with_a_result_in_the_outbox_is_a_duplicate(store: DeviceStore) -> None:
    store.put_result("r2-y", 2, b"UPDATE", T0 + HOUR)  # e.g. the inbox row was purged, the result kept

    assert put(store, "r2-y") is False


def test_purge_drops_expired_tasks_with_one_line_each(store: DeviceStore, caplog: pytest.LogCaptureFixture) -> None:
    put(store, "r3-abcdef0123456789", round_=3, ttl=60)
    put(store, "r3-short", round_=3, ttl=40)
    put(store, "r3-live", round_=3, ttl=HOUR)

    with caplog.at_level(logging.INFO, logger="fedflock.store"):
        report = store.purge(T0 + 60 + 12 * 60)

    assert report.expired_tasks == 2
    assert [r.getMessage() for r in caplog.records] == [
        "dropped task r3-short (round 3): deadline passed 12 min ago",
        "dropped task r3-abcdef01… (round 3): deadline passed 12 min ago",
    ]
    assert all(r.name == "fedflock.store" and r.levelno == logging.WARNING for r in caplog.records)
    assert [t.task_id for t in store.pending_tasks(T0)] == ["r3-live"]
    assert store.sizes().pending_tasks == 1


def test_finished_tasks_are_forgotten_after_retention(tmp_path: Path, clock: Clock) -> None:
    with open_store(tmp_path, clock, StoreConfig(retention_s=DAY)) as store:
        put(store, "old", ttl=10 * DAY)
        store.task_done("old")

        assert store.purge(T0 + DAY - 1).finished_tasks == 0
        assert put(store, "old", ttl=10 * DAY) is False

        assert store.purge(T0 + DAY + 1).finished_tasks == 1
        assert put(store, "old", ttl=10 * DAY) is True  # retention over: a re-delivery now is a new task


def test_tasks_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    with open_store(tmp_path, clock) as store:
        put(store, "kept")
    with open_store(tmp_path, clock) as store:
        assert [t.envelope for t in store.pending_tasks(T0)] == [b"TASK kept"]
        assert put(store, "kept") is False
