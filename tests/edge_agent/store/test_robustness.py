"""A full disk (a real SQLite page limit), concurrent callers, and space handed back by purge."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from edge_agent.store import DeviceStore, StorageFull, StoreConfig
from tests.edge_agent.store import DAY, T0, Clock, open_store

KIB = 1024


def envelope(i: int, size: int = 20 * KIB) -> bytes:
    return bytes([i % 251]) * size


def fill_until_full(store: DeviceStore) -> tuple[list[str], StorageFull]:
    """Put results until the page limit stops it; the task ids committed and the error."""
    committed: list[str] = []
    for i in range(10_000):
        try:
            store.put_result(f"r{i}", 1, envelope(i), T0 + DAY)
        except StorageFull as exc:
            return committed, exc
        committed.append(f"r{i}")
    raise AssertionError("the page limit never stopped the writes")


def assert_intact(store: DeviceStore, task_ids: list[str]) -> None:
    for task_id in task_ids:
        item = store.get_result(task_id)
        assert item is not None, task_id
        assert item.envelope == envelope(int(task_id[1:]))


def test_a_full_disk_loses_nothing_committed_and_writes_resume_when_space_returns(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path, clock, StoreConfig(max_db_bytes=400 * KIB)) as store:
        committed, error = fill_until_full(store)

        assert str(error).startswith("device storage full: could not store the result in ")
        assert str(tmp_path / "device.db") in str(error) and error.code == "storage_full"
        assert len(committed) >= 5
        failed = f"r{len(committed)}"
        assert store.get_result(failed) is None  # the failed write left nothing behind
        assert_intact(store, committed)
        store.verify()
        with pytest.raises(StorageFull):
            store.put_task("t-full", 1, envelope(0, 40 * KIB), T0, T0 + DAY)

        # space returns on the same connection: the agent drops two results the server gave up on
        store.drop_result(committed[0], "round closed")
        store.drop_result(committed[1], "round closed")
        assert store.put_result(failed, 1, envelope(len(committed)), T0 + DAY) is True
        survivors = [*committed[2:], failed]
        assert_intact(store, survivors)

    # ... and after a restart with the limit raised (the disk was cleaned up)
    with open_store(tmp_path, clock, StoreConfig(max_db_bytes=4096 * KIB)) as store:
        assert store.put_result("after", 1, envelope(7), T0 + DAY) is True
        assert store.put_task("t-after", 1, envelope(0, 40 * KIB), T0, T0 + DAY) is True
        assert_intact(store, survivors)
        assert store.sizes().pending_results == len(survivors) + 1
        store.verify()


def test_an_eviction_rolled_back_by_a_full_disk_is_neither_done_nor_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = StoreConfig(max_db_bytes=300 * KIB, max_result_bytes=100 * KIB, max_outbox_bytes=101 * KIB)
    with open_store(tmp_path, Clock(), config) as store:
        store.put_result("small", 1, b"s" * 2 * KIB, T0 + DAY)
        for i in range(1000):  # fill the disk with inbox tasks, which the outbox cap does not count
            try:
                store.put_task(f"t{i}", 1, envelope(i, 8 * KIB), T0, T0 + DAY)
            except StorageFull:
                break

        with caplog.at_level(logging.INFO, logger="fedflock.store"), pytest.raises(StorageFull):
            store.put_result("big", 1, b"b" * 100 * KIB, T0 + DAY)  # must evict "small" to fit the cap

        assert [r for r in caplog.records if r.name == "fedflock.store"] == []
        small = store.get_result("small")
        assert small is not None and small.envelope == b"s" * 2 * KIB


def test_concurrent_senders_get_unique_attempt_numbers(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock()) as store:
        store.put_result("r1", 1, b"UPDATE", T0 + DAY)
        attempts: list[int] = []

        def send() -> None:
            for _ in range(25):
                attempts.append(store.begin_attempt("r1"))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert not any(thread.is_alive() for thread in threads)
        assert sorted(attempts) == list(range(1, 101))


def test_the_ack_thread_and_the_main_loop_share_the_store(tmp_path: Path) -> None:
    count = 40
    with open_store(tmp_path, Clock()) as store:
        delivered: list[str] = []
        errors: list[BaseException] = []

        def ack_loop() -> None:  # stands in for the transport's publish-ack callback thread
            try:
                while len(delivered) < count:
                    item = store.next_to_send(T0)
                    if item is None:
                        time.sleep(0.001)
                        continue
                    store.begin_attempt(item.task_id)
                    assert store.mark_delivered(item.task_id)
                    delivered.append(item.task_id)
            except BaseException as exc:
                errors.append(exc)
                raise

        acker = threading.Thread(target=ack_loop)
        acker.start()
        for i in range(count):
            store.put_result(f"r{i}", 1, envelope(i, 100), T0 + DAY)
        acker.join(timeout=30)

        assert not acker.is_alive() and errors == []
        assert delivered == [f"r{i}" for i in range(count)]  # oldest first, each once
        sizes = store.sizes()
        assert (sizes.pending_results, sizes.delivered_results) == (0, count)


def test_purge_hands_freed_pages_back_to_the_disk(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock(), StoreConfig(retention_s=DAY)) as store:
        for i in range(10):
            store.put_result(f"r{i}", 1, envelope(i, 100 * KIB), T0 + 10 * DAY)
            store.mark_delivered(f"r{i}")
        full = store.sizes().bytes

        assert store.purge(T0 + 2 * DAY).delivered_results == 10

        assert full > 1000 * KIB
        assert store.sizes().bytes < 100 * KIB
