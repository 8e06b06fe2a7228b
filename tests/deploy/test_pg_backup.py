"""The PostgreSQL backup commands docs/operations.md gives, run against a real PostgreSQL server.

``pg_dump --format=custom`` of a store with rounds and model versions, ``pg_restore`` into a new
database, and the server's own store class reads the same rounds and weights back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import psycopg
import pytest

from broker_server.persistence import ModelVersionRow, PostgresServerStore
from broker_server.persistence.postgres_process import PostgresProcess
from broker_server.store import ModelStore
from tests.deploy.store_writer import TASKS, run_round, weights

pytestmark = pytest.mark.timeout(120)


def test_pg_dump_and_pg_restore_round_trip_the_store(tmp_path: Path) -> None:
    with PostgresProcess() as pg:
        with psycopg.connect(pg.conninfo("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE fedflock")
            conn.execute("CREATE DATABASE fedflock_restored")
        store = PostgresServerStore.open(pg.conninfo("fedflock"))
        try:
            store.put_model_version(
                ModelVersionRow(version=0, parent=None, bundle_digest="sha256:x", created_at=1.0, weights=weights(0))
            )
            models = ModelStore(tmp_path / "models")
            for number in (1, 2, 3):
                run_round(store, models, number)
        finally:
            store.close()
        dump = tmp_path / "fedflock.dump"
        # the documented commands (docs/operations.md, "Backup and restore")
        subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", pg.conninfo("fedflock")], check=True)
        subprocess.run(
            ["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={pg.conninfo('fedflock_restored')}", dump],
            check=True,
        )
        restored = PostgresServerStore.open(pg.conninfo("fedflock_restored"))
        try:
            assert restored.model_versions() == [0, 1, 2, 3] and restored.last_round() == 3
            snapshot = restored.load_round(3)
            assert snapshot.round.status == "completed" and snapshot.accepted == set(TASKS)
            version = restored.get_model_version(3)
            assert version is not None and version.weights is not None
            np.testing.assert_array_equal(version.weights["w"], weights(3)["w"])
        finally:
            restored.close()
