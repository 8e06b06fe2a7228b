"""Task bindings (nonce, base digest) in the server store, and the schema 1 -> 2 migration, on both backends."""

from __future__ import annotations

import dataclasses

from broker_server.persistence import SqlServerStore
from broker_server.persistence.resume import restore_round
from broker_server.persistence.schema import SCHEMA_VERSION
from edge_agent.protocol.binding import TaskBinding
from edge_agent.protocol.manifest import TensorSpec
from tests.broker_server.persistence.conftest import Backend, round_row, version_row

SPECS = (TensorSpec(name="w", shape=(2, 3), dtype="float32", role="parameter", trainable=True, aggregate=True),)
BINDINGS = {"t1": TaskBinding("1" * 32, "a" * 64), "t2": TaskBinding("2" * 32, "a" * 64)}


def test_bindings_are_stored_with_the_round_and_restored_into_its_state(
    backend: Backend, store: SqlServerStore
) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(dataclasses.replace(round_row(1, {"t1": "d1", "t2": "d2", "t3": "d3"}), bindings=BINDINGS))
    store.close()
    snapshot = backend.open().load_round(1)  # a restarted server
    assert dict(snapshot.round.bindings) == BINDINGS  # t3 was issued unbound: no entry
    assert {t.task_id: t.nonce for t in snapshot.tasks} == {"t1": "1" * 32, "t2": "2" * 32, "t3": ""}
    assert restore_round(snapshot, specs=SPECS).bindings == BINDINGS


def test_a_schema_1_store_migrates_and_its_tasks_stay_unbound(backend: Backend, store: SqlServerStore) -> None:
    store.put_model_version(version_row(0, None))
    store.create_round(round_row(1, {"t1": "d1"}))
    with store._transaction("downgrade to schema 1", write=True) as tx:  # what a v1 server left behind
        for table in ("scaleout_partials", "scaleout_claims", "scaleout_workers", "scaleout_rounds"):  # schema 3
            tx.execute(f"DROP TABLE {table}")
        tx.execute("ALTER TABLE round_tasks DROP COLUMN nonce")
        tx.execute("ALTER TABLE round_tasks DROP COLUMN base_digest")
        tx.execute("UPDATE fedflock_meta SET value = '1' WHERE key = 'schema_version'")
    assert store.schema_version() == 1
    store.close()
    migrated = backend.open()
    assert migrated.schema_version() == SCHEMA_VERSION >= 2
    snapshot = migrated.load_round(1)
    assert snapshot.round.tasks == {"t1": "d1"} and dict(snapshot.round.bindings) == {}
    migrated.create_round(dataclasses.replace(round_row(2, {"t9": "d1"}), bindings={"t9": BINDINGS["t1"]}))
    assert dict(migrated.load_round(2).round.bindings) == {"t9": BINDINGS["t1"]}
