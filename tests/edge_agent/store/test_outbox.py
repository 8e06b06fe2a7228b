"""The outbox: durable idempotent results, send order, attempts, delivery, drops, the size cap."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.errors import StorageError
from edge_agent.store import DeviceStore, StoreConfig
from tests.edge_agent.store import DAY, HOUR, T0, Clock, open_store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[DeviceStore]:
    with open_store(tmp_path, clock) as store:
        yield store


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedflock.store"]


def test_put_result_is_idempotent_and_keeps_the_first_envelope(store: DeviceStore, clock: Clock) -> None:
    assert store.put_result("r1-a", 1, b"UPDATE one", T0 + HOUR) is True
    store.begin_attempt("r1-a")
    clock.advance(10)

    assert store.put_result("r1-a", 1, b"UPDATE two", T0 + 2 * HOUR) is False

    item = store.next_to_send(T0)
    assert item is not None
    assert (item.task_id, item.round, item.envelope, item.attempts) == ("r1-a", 1, b"UPDATE one", 1)
    assert (item.created_at, item.expires_at, item.delivered_at) == (T0, T0 + HOUR, None)
    assert store.sizes().pending_results == 1


def test_put_result_finishes_its_inbox_task_in_the_same_commit(store: DeviceStore) -> None:
    store.put_task("r1-b", 1, b"TASK", T0, T0 + HOUR)

    store.put_result("r1-b", 1, b"UPDATE", T0 + HOUR)

    assert store.pending_tasks(T0) == []
    assert store.task_done("r1-b") is False  # already finished by put_result


def test_next_to_send_is_oldest_first_even_if_the_clock_steps_back(store: DeviceStore, clock: Clock) -> None:
    store.put_result("first", 1, b"1", T0 + DAY)
    clock.advance(-HOUR)  # NTP sync on a device without an RTC
    store.put_result("second", 1, b"2", T0 + DAY)

    first = store.next_to_send(T0)
    assert first is not None and first.task_id == "first"
    store.mark_delivered("first")
    second = store.next_to_send(T0)
    assert second is not None and second.task_id == "second"
    store.mark_delivered("second")
    assert store.next_to_send(T0) is None


def test_begin_attempt_counts_up_and_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    with open_store(tmp_path, clock) as store:
        store.put_result("r4-a", 4, b"UPDATE", T0 + HOUR)
        assert [store.begin_attempt("r4-a") for _ in range(3)] == [1, 2, 3]
    with open_store(tmp_path, clock) as store:
        assert store.begin_attempt("r4-a") == 4  # a new idempotency key after the restart
        item = store.next_to_send(T0)
        assert item is not None and item.attempts == 4


def test_begin_attempt_for_an_unknown_task_raises(store: DeviceStore) -> None:
    with pytest.raises(StorageError, match="no result for task 'nope'"):
        store.begin_attempt("nope")


def test_delivered_results_are_kept_for_redelivery_then_purged_quietly(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with open_store(tmp_path, clock, StoreConfig(retention_s=DAY)) as store:
        store.put_result("r5-a", 5, b"UPDATE", T0 + 10 * DAY)
        assert store.mark_delivered("r5-a") is True
        assert store.mark_delivered("r5-a") is False
        assert store.next_to_send(T0) is None

        kept = store.get_result("r5-a")
        assert kept is not None and kept.envelope == b"UPDATE" and kept.delivered_at == T0
        assert store.sizes().delivered_results == 1

        with caplog.at_level(logging.DEBUG, logger="fedflock.store"):
            assert store.purge(T0 + DAY - 1).delivered_results == 0
            assert store.purge(T0 + DAY + 1).delivered_results == 1
        assert messages(caplog) == []
        assert store.get_result("r5-a") is None
        assert store.sizes().delivered_results == 0


def test_requeue_makes_a_delivered_result_pending_again(store: DeviceStore) -> None:
    store.put_result("r6-a", 6, b"UPDATE", T0 + HOUR)
    assert store.requeue_result("r6-a") is False  # still pending
    store.mark_delivered("r6-a")

    assert store.requeue_result("r6-a") is True

    item = store.next_to_send(T0)
    assert item is not None and item.task_id == "r6-a" and item.delivered_at is None


def test_expired_results_are_not_sent_and_purge_logs_each(store: DeviceStore, caplog: pytest.LogCaptureFixture) -> None:
    store.put_result("r7-late", 7, b"UPDATE", T0 + 60)
    store.begin_attempt("r7-late")
    store.begin_attempt("r7-late")
    store.put_result("r7-live", 7, b"UPDATE", T0 + DAY)

    item = store.next_to_send(T0 + 61)
    assert item is not None and item.task_id == "r7-live"

    with caplog.at_level(logging.INFO, logger="fedflock.store"):
        report = store.purge(T0 + 60 + 3 * HOUR)
    assert report.expired_results == 1
    assert messages(caplog) == ["dropped result r7-late (round 7) after 2 attempts: deadline passed 3 h ago"]
    assert store.get_result("r7-late") is None


def test_drop_result_logs_the_reason(store: DeviceStore, caplog: pytest.LogCaptureFixture) -> None:
    store.put_result("r8-a", 8, b"UPDATE", T0 + HOUR)
    store.begin_attempt("r8-a")

    with caplog.at_level(logging.INFO, logger="fedflock.store"):
        assert store.drop_result("r8-a", "server closed round 8") is True
        assert store.drop_result("r8-a", "again") is False

    assert messages(caplog) == ["dropped result r8-a (round 8) after 1 attempt: server closed round 8"]
    assert caplog.records[0].levelno == logging.WARNING
    assert store.next_to_send(T0) is None
    assert store.mark_delivered("r8-a") is False  # a late ack for a dropped result is harmless


def test_a_result_over_max_result_bytes_is_refused(tmp_path: Path, clock: Clock) -> None:
    with open_store(tmp_path, clock, StoreConfig(max_result_bytes=100, max_outbox_bytes=1000)) as store:
        with pytest.raises(StorageError, match="101 bytes, more than max_result_bytes 100"):
            store.put_result("big", 1, b"x" * 101, T0 + HOUR)
        assert store.put_result("fits", 1, b"x" * 100, T0 + HOUR) is True
        assert store.get_result("big") is None


def test_the_outbox_cap_evicts_the_least_useful_results_first(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    config = StoreConfig(max_result_bytes=100, max_outbox_bytes=300)
    with open_store(tmp_path, clock, config) as store:
        store.put_result("pending-old", 1, b"a" * 100, T0 + DAY)
        store.put_result("expired", 1, b"b" * 100, T0 + 60)
        store.put_result("delivered", 2, b"c" * 100, T0 + DAY)
        store.mark_delivered("delivered")
        clock.advance(120)  # "expired" is now past its deadline

        with caplog.at_level(logging.INFO, logger="fedflock.store"):
            store.put_result("new-1", 3, b"d" * 100, T0 + DAY)
            store.put_result("new-2", 3, b"e" * 50, T0 + DAY)
            store.put_result("new-3", 3, b"f" * 100, T0 + DAY)

        assert messages(caplog) == [
            "dropped result expired (round 1) after 0 attempts: evicted to keep the outbox under max_outbox_bytes",
            "dropped delivered result delivered (round 2) after 0 attempts: "
            "evicted to keep the outbox under max_outbox_bytes",
            "dropped result pending-old (round 1) after 0 attempts: evicted to keep the outbox under max_outbox_bytes",
        ]
        sizes = store.sizes()
        assert sizes.outbox_bytes == 250
        assert (sizes.pending_results, sizes.delivered_results) == (3, 0)
        assert [store.get_result(t) is not None for t in ("new-1", "new-2", "new-3")] == [True, True, True]


def test_sizes_counts_each_state(store: DeviceStore) -> None:
    store.put_task("t1", 1, b"TASK", T0, T0 + HOUR)
    store.put_task("t2", 1, b"TASK", T0, T0 + HOUR)
    store.put_result("t1", 1, b"12345", T0 + HOUR)
    store.put_result("t3", 1, b"123", T0 + HOUR)
    store.mark_delivered("t3")

    sizes = store.sizes()
    assert (sizes.pending_tasks, sizes.pending_results, sizes.delivered_results) == (1, 1, 1)
    assert sizes.outbox_bytes == 8

    store.put_result("t4", 1, b"x" * 200_000, T0 + HOUR)
    assert store.sizes().bytes >= sizes.bytes + 150_000  # the pages holding the envelope
