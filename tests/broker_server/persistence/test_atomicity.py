"""Acceptance and checkpoint are one transaction: a crash, a stale writer or a duplicate never
double-counts or loses an update. Run against every backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import AggregateCheckpoint, DeviceRow, SqlServerStore, StoreConflict, queries
from tests.broker_server.persistence.conftest import (
    Backend,
    assert_checkpoint_equal,
    checkpoint,
    round_row,
    version_row,
)

REPO = Path(__file__).resolve().parents[3]


def _round_with_one_acceptance(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1))
    assert store.record_acceptance(1, "t1", key="d1/t1/1", checkpoint=checkpoint(["t1"]))


def _assert_only_t1(store: SqlServerStore) -> None:
    snapshot = store.load_round(1)
    assert snapshot.accepted == {"t1"}
    assert {t.task_id: t.state for t in snapshot.tasks}["t2"] == "open"
    assert_checkpoint_equal(snapshot.checkpoint, checkpoint(["t1"]))
    device = store.get_device("d2")
    assert device is not None and device.accepted == 0


def test_failure_between_acceptance_and_checkpoint_leaves_nothing(
    backend: Backend, store: SqlServerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _round_with_one_acceptance(store)
    real = queries.write_aggregate
    reached = []

    def crash(*args: object, **kwargs: object) -> None:
        reached.append(True)  # the task row is already marked accepted in this transaction
        raise RuntimeError("power cut")

    monkeypatch.setattr(queries, "write_aggregate", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        store.record_acceptance(1, "t2", key="d2/t2/1", checkpoint=checkpoint(["t1", "t2"]))
    assert reached
    _assert_only_t1(store)
    _assert_only_t1(backend.open())  # another connection sees the same

    monkeypatch.setattr(queries, "write_aggregate", real)  # the device re-sends: accepted now, once
    assert store.record_acceptance(1, "t2", key="d2/t2/1", checkpoint=checkpoint(["t1", "t2"]))
    assert_checkpoint_equal(store.load_round(1).checkpoint, checkpoint(["t1", "t2"]))


_CRASHING_CHILD = """
import os, sys
from broker_server.persistence import PostgresServerStore, SqliteServerStore, queries
from tests.broker_server.persistence.conftest import checkpoint

spec = sys.argv[1:]
store = SqliteServerStore.open(spec[1]) if spec[0] == "sqlite" else PostgresServerStore.open(spec[1], schema=spec[2])
real = queries.write_aggregate

def write_then_die(*args, **kwargs):
    real(*args, **kwargs)  # task marked accepted and new sums written, not yet committed
    os._exit(17)

queries.write_aggregate = write_then_die
store.record_acceptance(1, "t2", key="d2/t2/1", checkpoint=checkpoint(["t1", "t2"]))
os._exit(0)
"""


def test_process_killed_mid_transaction_leaves_nothing(backend: Backend, store: SqlServerStore) -> None:
    _round_with_one_acceptance(store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, *backend.spec], env=env, capture_output=True, timeout=60
    )
    assert child.returncode == 17, child.stderr.decode(errors="replace")
    _assert_only_t1(backend.open())


def test_same_idempotency_key_twice_is_refused(store: SqlServerStore) -> None:
    _round_with_one_acceptance(store)
    before = store.load_round(1)
    assert not store.record_acceptance(1, "t1", key="d1/t1/1", checkpoint=checkpoint(["t1"]))
    # another attempt of the same task, with a checkpoint that would count it twice
    twice = checkpoint(["t1"])
    doubled = AggregateCheckpoint(
        sums={k: 2 * v for k, v in twice.sums.items()},
        total_weight=2 * twice.total_weight,
        count=1,
        accepted=twice.accepted,
    )
    assert not store.record_acceptance(1, "t1", key="d1/t1/2", checkpoint=doubled)
    after = store.load_round(1)
    assert_checkpoint_equal(after.checkpoint, before.checkpoint)
    assert [t.key for t in after.tasks if t.task_id == "t1"] == ["d1/t1/1"]
    device = store.get_device("d1")
    assert device is not None and device.accepted == 1


def test_checkpoint_not_built_on_the_stored_one_is_refused(backend: Backend, store: SqlServerStore) -> None:
    _round_with_one_acceptance(store)
    other = backend.open()  # a second server that missed nothing but raced
    assert store.record_acceptance(1, "t2", key="d2/t2/1", checkpoint=checkpoint(["t1", "t2"]))
    with pytest.raises(StoreConflict, match="not built on the stored one"):
        other.record_acceptance(1, "t3", key="d3/t3/1", checkpoint=checkpoint(["t1", "t3"]))
    snapshot = store.load_round(1)
    assert snapshot.accepted == {"t1", "t2"}  # t3 stays open: its device's re-send is accepted later
    assert_checkpoint_equal(snapshot.checkpoint, checkpoint(["t1", "t2"]))
    with pytest.raises(StoreConflict, match="does not include"):
        store.record_acceptance(1, "t3", key="d3/t3/1", checkpoint=checkpoint(["t1", "t2"]))


@pytest.mark.parametrize("shared", [False, True], ids=["two-connections", "one-shared-store"])
def test_concurrent_writers_do_not_corrupt(backend: Backend, shared: bool) -> None:
    setup = backend.open()
    setup.put_model_version(version_row(0, None))
    devices = [f"d{i}" for i in range(5)]
    per_thread = 12
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            store = setup if shared else backend.open()
            tasks = {f"r{number}-t{i:02d}": devices[i % len(devices)] for i in range(per_thread)}
            start.wait(timeout=10)
            store.create_round(round_row(number, tasks))
            done: list[str] = []
            for task_id, device_id in tasks.items():
                done.append(task_id)
                assert store.record_acceptance(number, task_id, key=f"{task_id}/1", checkpoint=checkpoint(done))
                store.upsert_device(DeviceRow(device_id=device_id, online=True, last_seen=time.time()))
                store.put_setting(f"progress-{number}", len(done))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    check = backend.open()
    for number in (1, 2):
        snapshot = check.load_round(number)
        assert len(snapshot.accepted) == per_thread
        assert_checkpoint_equal(snapshot.checkpoint, checkpoint(sorted(snapshot.round.tasks)))
        assert check.get_setting(f"progress-{number}") == per_thread
    counts = {d.device_id: (d.selected, d.accepted) for d in check.devices()}
    # every device got per_thread/5 tasks (rounded) in each round: no lost counter increments
    expected = {d: (2 * n, 2 * n) for d, n in zip(devices, np.bincount(np.arange(per_thread) % 5), strict=True)}
    assert counts == expected


def test_two_writers_racing_on_one_round_lose_nothing(backend: Backend) -> None:
    """Each writer builds its checkpoint from the stored one and retries on a conflict, as a
    second server sharing the database would; every update ends up counted exactly once."""
    setup = backend.open()
    setup.put_model_version(version_row(0, None))
    tasks = {f"t{i:02d}": f"d{i % 3}" for i in range(16)}
    setup.create_round(round_row(1, tasks))
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    conflicts = [0, 0]

    def worker(index: int) -> None:
        try:
            store = backend.open()
            start.wait(timeout=10)
            for task_id in sorted(tasks)[index::2]:
                while True:
                    stored = store.load_round(1).checkpoint
                    try:
                        store.record_acceptance(
                            1, task_id, key=f"{task_id}/1", checkpoint=checkpoint([*sorted(stored.accepted), task_id])
                        )
                        break
                    except StoreConflict:
                        conflicts[index] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    snapshot = setup.load_round(1)
    assert snapshot.accepted == set(tasks)
    expected = checkpoint(sorted(tasks))
    assert snapshot.checkpoint.count == len(tasks)
    assert snapshot.checkpoint.total_weight == pytest.approx(expected.total_weight)
    for name, value in expected.sums.items():
        np.testing.assert_allclose(snapshot.checkpoint.sums[name], value, rtol=1e-12)
