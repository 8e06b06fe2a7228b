"""Restarting the server mid-round: the round resumes from the store with no update lost or
counted twice. Drives a real RoundState with encoded UPDATEs, against every backend."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.persistence import AggregateCheckpoint, RoundRow, SqlServerStore, StorageError
from broker_server.persistence.resume import checkpoint_of, restore_round, result_key
from broker_server.rounds import RoundState
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage
from tests.broker_server.persistence.conftest import Backend, version_row

SPECS = (
    TensorSpec(name="w", shape=(2, 3), dtype="float32", role="parameter", trainable=True, aggregate=True),
    TensorSpec(name="b", shape=(3,), dtype="float32", role="parameter", trainable=True, aggregate=True),
)
TASKS = {"t1": "d1", "t2": "d2", "t3": "d3", "t4": "d4", "t5": "d5"}


def update(task: str, n: int, attempt: int = 1) -> UpdateMessage:
    rng = np.random.default_rng(int(task[1:]))
    delta = {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    payload = encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0))
    return UpdateMessage(
        device_id=TASKS[task],
        round=1,
        task_id=task,
        model_version=0,
        num_examples=n,
        metrics={"train_loss": 0.1 * n},
        payload=payload,
        attempt=attempt,
    )


def new_state() -> RoundState:
    return RoundState(round=1, model_version=0, tasks=dict(TASKS), specs=SPECS, codecs=frozenset({"fp32"}))


def accept(store: SqlServerStore, state: RoundState, message: UpdateMessage) -> bool:
    """What the server's dispatch does with the store wired in."""
    if not state.accept_update(message):
        return False
    return store.record_acceptance(1, message.task_id, key=result_key(message), checkpoint=checkpoint_of(state))


def open_round(store: SqlServerStore) -> RoundState:
    store.put_model_version(version_row(0, None))
    store.create_round(
        RoundRow(round=1, model_version=0, tasks=TASKS, deadline=9e9, created_at=1.0, config={"codecs": ["fp32"]})
    )
    return new_state()


def test_restart_resumes_the_round_with_identical_sums(backend: Backend) -> None:
    store = backend.open()
    state = open_round(store)
    for task, n in [("t1", 10), ("t2", 25), ("t3", 7)]:
        assert accept(store, state, update(task, n))
    error = ErrorMessage(device_id="d4", round=1, task_id="t4", code="training_error", reason="nan")
    assert state.record_error(error)
    assert store.record_failure(1, "t4", key=result_key(error), reason=state.failed["t4"])
    before = checkpoint_of(state)
    store.close()  # the server dies; a new process opens the store

    restored = restore_round(backend.open().load_round(1), specs=SPECS, codecs=["fp32"])
    assert restored.accepted == {"t1", "t2", "t3"} and restored.failed == {"t4": "training_error: nan"}
    assert restored.mean.count == 3 and restored.mean.total_weight == before.total_weight == 42.0
    assert restored.metric_sums == pytest.approx(dict(before.metric_sums))
    after = checkpoint_of(restored)
    for name in ("w", "b"):
        np.testing.assert_array_equal(after.sums[name], before.sums[name])  # bit-identical float64
    np.testing.assert_array_equal(restored.mean.result()["w"], state.mean.result()["w"])
    assert restored.mean_metrics() == pytest.approx(state.mean_metrics())


def test_after_a_restart_resent_updates_count_once_and_the_round_completes(backend: Backend) -> None:
    reference = new_state()
    for task, n in [("t1", 10), ("t2", 25), ("t3", 7), ("t5", 3)]:
        reference.accept_update(update(task, n))

    store = backend.open()
    state = open_round(store)
    for task, n in [("t1", 10), ("t2", 25), ("t3", 7)]:
        accept(store, state, update(task, n))
    store.close()

    store = backend.open()
    resumed = restore_round(store.load_round(1), specs=SPECS)
    # devices whose acks were lost re-send (a new attempt): refused in memory and in the store
    assert not accept(store, resumed, update("t2", 25, attempt=2))
    assert not store.record_acceptance(
        1, "t2", key=result_key(update("t2", 25, attempt=2)), checkpoint=checkpoint_of(resumed)
    )
    assert resumed.duplicates == 1
    assert accept(store, resumed, update("t5", 3))
    np.testing.assert_allclose(resumed.mean.result()["w"], reference.mean.result()["w"], rtol=1e-6)
    assert resumed.mean.total_weight == reference.mean.total_weight
    stored = store.load_round(1).checkpoint
    assert stored.accepted == {"t1", "t2", "t3", "t5"} and stored.total_weight == 45.0


def test_a_closed_round_or_a_changed_model_cannot_be_resumed(backend: Backend) -> None:
    store = backend.open()
    state = open_round(store)
    accept(store, state, update("t1", 10))
    other_specs = (TensorSpec(name="w", shape=(4,), dtype="float32", role="parameter", trainable=True, aggregate=True),)
    with pytest.raises(StorageError, match="do not match"):
        restore_round(store.load_round(1), specs=other_specs)
    store.abandon_round(1, reason="server upgraded")
    with pytest.raises(StorageError, match="abandoned"):
        restore_round(store.load_round(1), specs=SPECS)


def test_checkpoint_of_is_a_copy() -> None:
    state = new_state()
    state.accept_update(update("t1", 10))
    snapshot = checkpoint_of(state)
    state.accept_update(update("t2", 5))
    assert isinstance(snapshot, AggregateCheckpoint) and snapshot.count == 1 and snapshot.total_weight == 10.0
    assert not np.array_equal(snapshot.sums["w"], checkpoint_of(state).sums["w"])


def test_result_keys() -> None:
    assert result_key(update("t1", 1, attempt=3)) == "d1/t1/3"
    assert result_key(ErrorMessage(device_id="d1", round=1, task_id="t1", code="x", reason="y")) == "d1/t1/error"
