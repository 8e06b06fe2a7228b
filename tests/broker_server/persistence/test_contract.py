"""The ServerStore contract, written once and run against every backend (SQLite, PostgreSQL)."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.persistence import (
    SCHEMA_VERSION,
    DeviceRow,
    RecordNotFound,
    ServerStore,
    SqlServerStore,
    StorageError,
    StoreConflict,
    StrategyStateRow,
)
from broker_server.persistence.schema import MIGRATIONS, TABLES, Tx, ensure_schema
from tests.broker_server.persistence.conftest import (
    Backend,
    checkpoint,
    round_row,
    version_row,
    weights,
)


def test_every_backend_implements_the_protocol(store: SqlServerStore) -> None:
    typed: ServerStore = store  # mypy checks the structural match
    assert typed.schema_version() == SCHEMA_VERSION


def test_reopening_keeps_the_schema_and_data(backend: Backend) -> None:
    first = backend.open()
    first.put_setting("federation", "digits")
    first.close()
    again = backend.open()
    assert again.schema_version() == SCHEMA_VERSION
    assert again.get_setting("federation") == "digits"


# -- devices -------------------------------------------------------------------------------------


def test_device_round_trip_and_update(store: SqlServerStore) -> None:
    device = DeviceRow(
        device_id="pi-7",
        online=True,
        bundle_digest="sha256:abc",
        num_examples=412,
        agent_version="0.1.0",
        last_seen=1234.5,
        eligibility={"eligible": False, "phase": "train", "reasons": ["battery 12% < 30%"]},
    )
    store.upsert_device(device)
    assert store.get_device("pi-7") == device
    store.upsert_device(DeviceRow(device_id="pi-7", online=False, last_seen=2000.0))
    got = store.get_device("pi-7")
    assert got is not None and not got.online and got.last_seen == 2000.0 and got.eligibility == {}
    assert store.get_device("nope") is None


def test_participation_counters_follow_rounds_and_survive_upserts(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.upsert_device(DeviceRow(device_id="d1", online=True, selected=99, accepted=99))  # counters ignored
    store.create_round(round_row(1))
    store.record_acceptance(1, "t1", key="d1/t1/1", checkpoint=checkpoint(["t1"]))
    store.record_failure(1, "t2", key="d2/t2/error", reason="training_error: nan")
    store.upsert_device(DeviceRow(device_id="d1", online=False, num_examples=5))
    devices = {d.device_id: d for d in store.devices()}
    assert sorted(devices) == ["d1", "d2", "d3", "d4"]  # unseen devices get a bare record
    assert (devices["d1"].selected, devices["d1"].accepted, devices["d1"].failed) == (1, 1, 0)
    assert (devices["d2"].selected, devices["d2"].accepted, devices["d2"].failed) == (1, 0, 1)
    assert (devices["d3"].selected, devices["d3"].accepted) == (1, 0)
    assert devices["d1"].num_examples == 5 and not devices["d1"].online


# -- rounds --------------------------------------------------------------------------------------


def test_the_store_counts_participation_outside_rounds(store: SqlServerStore) -> None:
    store.count_participation("selected", ["b", "a", "a"])
    store.count_participation("accepted", ["a"])
    store.count_participation("failed", ["b"])
    store.count_participation("selected", [])
    rows = {row.device_id: (row.selected, row.accepted, row.failed) for row in store.devices()}
    assert rows == {"a": (2, 1, 0), "b": (1, 0, 1)}
    with pytest.raises(ValueError, match="participation counter"):
        store.count_participation("rounds", ["a"])


def test_round_round_trip(backend: Backend, store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    row = round_row(3)
    store.create_round(row)
    snapshot = store.load_round(3)
    assert snapshot.round == row
    assert [(t.task_id, t.device_id, t.state, t.key) for t in snapshot.tasks] == [
        ("t1", "d1", "open", None),
        ("t2", "d2", "open", None),
        ("t3", "d3", "open", None),
        ("t4", "d4", "open", None),
    ]
    assert snapshot.checkpoint.count == 0 and not snapshot.checkpoint.sums
    assert store.open_rounds() == [3] and store.last_round() == 3


def test_round_needs_a_stored_model_version_and_a_new_number(store: SqlServerStore) -> None:
    with pytest.raises(RecordNotFound, match="v0"):
        store.create_round(round_row(1))
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1))
    with pytest.raises(StoreConflict, match="already exists"):
        store.create_round(round_row(1, tasks={"x": "d9"}))
    assert store.load_round(1).round.tasks == round_row(1).tasks
    assert store.get_device("d9") is None  # the refused round counted nothing
    with pytest.raises(RecordNotFound):
        store.load_round(2)


def test_failure_round_trip(backend: Backend, store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1))
    assert store.record_failure(1, "t2", key="d2/t2/error", reason="training_error: loss is nan")
    assert not store.record_failure(1, "t2", key="d2/t2/error", reason="again")
    snapshot = store.load_round(1)
    assert snapshot.failed == {"t2": "training_error: loss is nan"}
    (task,) = [t for t in snapshot.tasks if t.task_id == "t2"]
    assert task.state == "failed" and task.key == "d2/t2/error"
    assert task.reported_at is not None and task.reported_at > 1000.0  # the injected clock
    with pytest.raises(RecordNotFound, match="no task"):
        store.record_failure(1, "t99", key="k", reason="x")


def test_complete_round_stores_the_version_and_drops_the_sums(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1))
    store.record_acceptance(1, "t1", key="d1/t1/1", checkpoint=checkpoint(["t1"]))
    store.complete_round(1, version=version_row(1, 0, metrics={"test_accuracy": 0.91}))
    snapshot = store.load_round(1)
    assert snapshot.round.status == "completed" and snapshot.round.result_version == 1
    assert snapshot.round.closed_at is not None
    assert snapshot.checkpoint.sums == {} and snapshot.checkpoint.count == 1  # weight and count are kept
    assert snapshot.checkpoint.total_weight == checkpoint(["t1"]).total_weight
    stored = store.get_model_version(1)
    assert stored is not None and stored.round == 1 and stored.metrics == {"test_accuracy": 0.91}
    assert store.open_rounds() == []
    with pytest.raises(StoreConflict, match="closed"):
        store.record_acceptance(1, "t2", key="d2/t2/1", checkpoint=checkpoint(["t1", "t2"]))
    assert not store.record_acceptance(1, "t1", key="d1/t1/2", checkpoint=checkpoint(["t1"]))  # late duplicate


def test_complete_round_is_atomic(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.put_model_version(version_row(1, 0))
    store.create_round(round_row(1))
    adam = StrategyStateRow(name="fedadam", tensors={"m/w": np.ones(3)}, state={"steps": 1}, round=1)
    with pytest.raises(StoreConflict, match="already stored"):
        store.complete_round(1, version=version_row(1, 0), strategy=adam)
    assert store.load_round(1).round.status == "open"  # the round was not closed without its version
    assert store.get_strategy_state("fedadam") is None  # and the strategy did not step
    store.complete_round(1, version=version_row(2, 1), strategy=adam)
    stored = store.get_strategy_state("fedadam")
    assert stored is not None and stored.state == {"steps": 1} and stored.round == 1
    assert store.load_round(1).round.result_version == 2


def test_abandon_round(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1))
    store.abandon_round(1, reason="0 updates by the deadline, need 1")
    row = store.load_round(1).round
    assert row.status == "abandoned" and row.reason == "0 updates by the deadline, need 1"
    assert row.result_version is None
    with pytest.raises(StoreConflict):
        store.abandon_round(1, reason="again")
    with pytest.raises(StoreConflict):
        store.complete_round(1, version=version_row(1, 0))
    assert store.model_versions() == [0]


# -- model versions ------------------------------------------------------------------------------


def test_model_version_round_trip(store: SqlServerStore) -> None:
    original = version_row(0, None, metrics={"test_loss": 1.25, "nested": {"a": [1, 2]}})
    store.put_model_version(original)
    got = store.get_model_version(0)
    assert got is not None and got.weights is not None
    assert (got.version, got.parent, got.bundle_digest, got.created_at, got.metrics) == (
        0,
        None,
        "sha256:abc",
        10.0,
        {"test_loss": 1.25, "nested": {"a": [1, 2]}},
    )
    for name, value in weights().items():
        assert got.weights[name].dtype == np.float32
        np.testing.assert_array_equal(got.weights[name], value)
    got.weights["w"][0, 0] = 42.0  # a writable copy, not a view into the driver's buffer
    light = store.get_model_version(0, weights=False)
    assert light is not None and light.weights is None and light.metrics == got.metrics
    assert store.get_model_version(7) is None


def test_model_version_by_path(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None, weights=None, weights_path="/srv/models/v000000/weights.fft"))
    got = store.get_model_version(0)
    assert got is not None and got.weights is None and got.weights_path == "/srv/models/v000000/weights.fft"
    with pytest.raises(ValueError, match="weights_path"):
        store.put_model_version(version_row(1, 0, weights=None))


def test_model_version_rules(store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    with pytest.raises(StoreConflict, match="already stored"):
        store.put_model_version(version_row(0, None))
    with pytest.raises(RecordNotFound, match="parent"):
        store.put_model_version(version_row(5, 4))
    with pytest.raises(ValueError, match="older"):
        version_row(3, 3)
    assert store.model_versions() == [0]


def test_lineage_follows_parents_to_the_root(store: SqlServerStore) -> None:
    # 0 -> 1 -> 2 -> 3, and a rollback branch 1 -> 4 -> 5
    for version, parent in [(0, None), (1, 0), (2, 1), (3, 2), (4, 1), (5, 4)]:
        store.put_model_version(version_row(version, parent, round=version or None))
    assert [v.version for v in store.lineage(3)] == [3, 2, 1, 0]
    assert [v.version for v in store.lineage(5)] == [5, 4, 1, 0]
    chain = store.lineage(5)
    assert chain[0].parent == 4 and chain[-1].parent is None and all(v.weights is None for v in chain)
    assert store.lineage(99) == []
    assert store.model_versions() == [0, 1, 2, 3, 4, 5]


# -- strategy, rollout, settings -----------------------------------------------------------------


def test_strategy_state_round_trip(store: SqlServerStore) -> None:
    assert store.get_strategy_state("fedadam") is None
    moments = {"m/w": np.linspace(0, 1, 6).reshape(2, 3), "v/w": np.full((2, 3), 1e-8)}
    store.put_strategy_state(StrategyStateRow(name="fedadam", tensors=moments, state={"t": 3, "beta1": 0.9}, round=3))
    store.put_strategy_state(StrategyStateRow(name="fedadam", tensors=moments, state={"t": 4, "beta1": 0.9}, round=4))
    got = store.get_strategy_state("fedadam")
    assert got is not None and got.state == {"t": 4, "beta1": 0.9} and got.round == 4
    assert got.updated_at > 1000.0  # stamped by the store's clock
    for name, value in moments.items():
        assert got.tensors[name].dtype == np.float64
        np.testing.assert_array_equal(got.tensors[name], value)


def test_rollout_state_and_settings(store: SqlServerStore) -> None:
    assert store.get_rollout_state("current") is None
    store.put_rollout_state("current", {"version": 3, "stage": "canary", "fraction": 0.1})
    store.put_rollout_state("current", {"version": 3, "stage": "full", "fraction": 1.0})
    store.put_rollout_state("beta", {"version": 4})
    assert store.get_rollout_state("current") == {"version": 3, "stage": "full", "fraction": 1.0}
    assert store.get_rollout_state("beta") == {"version": 4}
    store.put_setting("seed", 7)
    store.put_setting("nothing", None)
    store.put_setting("codecs", ["int8", "fp32"])
    assert store.get_setting("seed") == 7
    assert store.get_setting("nothing", default="absent") is None  # a stored null is not "missing"
    assert store.get_setting("missing", default="absent") == "absent"
    assert store.get_setting("codecs") == ["int8", "fp32"]


def test_closed_store_refuses_calls(backend: Backend) -> None:
    store = backend.open()
    store.close()
    store.close()  # idempotent
    with pytest.raises(Exception, match="not open") as info:
        store.get_setting("x")
    assert info.value.__class__.__name__ == "StorageError"


def test_a_failed_migration_leaves_the_old_schema(store: SqlServerStore) -> None:
    def add_table(tx: Tx) -> None:
        tx.execute("CREATE TABLE audit (id BIGINT PRIMARY KEY)")
        tx.execute("INSERT INTO audit (id) VALUES (1)")
        raise RuntimeError("the next step broke half-way")

    store.put_setting("kept", True)
    with pytest.raises(RuntimeError, match="half-way"), store._transaction("migrate", write=True) as tx:
        ensure_schema(tx, store.where, migrations={**MIGRATIONS, SCHEMA_VERSION: add_table}, target=SCHEMA_VERSION + 1)
    assert store.schema_version() == SCHEMA_VERSION
    with store._transaction("list tables", write=False) as tx:
        tables = {str(row[0]) for row in tx.execute(store.dialect.list_tables).fetchall()}
    assert "audit" not in tables and tables >= TABLES  # DDL rolled back with the transaction
    assert store.get_setting("kept") is True


def test_a_newer_schema_is_refused(backend: Backend, store: SqlServerStore) -> None:
    with store._transaction("pretend an upgrade", write=True) as tx:
        tx.execute("UPDATE fedflock_meta SET value = '99' WHERE key = 'schema_version'")
    store.close()
    with pytest.raises(StorageError, match="newer"):
        backend.open()
