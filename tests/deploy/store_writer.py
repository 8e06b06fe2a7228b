"""A stand-in for a running server's writes, as a separate process: ``python3 -m tests.deploy.store_writer``.

It drives the real SQLite server store and the real model directory the way ``FederatedServer``
does: open a round with four tasks, accept each with its aggregate checkpoint (one transaction
each), complete the round with a new model version, then write that version's files
(``ModelStore.save``: store first, files second). It prints ``ready`` after the first round and
stops when the stop file appears, after ``max_rounds``, or after 60 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from broker_server.persistence import AggregateCheckpoint, ModelVersionRow, RoundRow, SqliteServerStore, SqlServerStore
from broker_server.store import ModelStore

TASKS = {f"t{i}": f"d{i}" for i in range(4)}


def weights(version: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(version)
    return {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.full(32, version, np.float32)}


def checkpoint(accepted: list[str]) -> AggregateCheckpoint:
    sums = {"w": np.full((2, 3), float(len(accepted)))}
    return AggregateCheckpoint(
        sums=sums, total_weight=float(len(accepted)), count=len(accepted), accepted=frozenset(accepted)
    )


def run_round(store: SqlServerStore, models: ModelStore, number: int) -> None:
    store.create_round(
        RoundRow(round=number, model_version=number - 1, tasks=TASKS, deadline=1e12, created_at=time.time())
    )
    accepted: list[str] = []
    for task_id in TASKS:
        accepted.append(task_id)
        store.record_acceptance(number, task_id, key=f"{number}/{task_id}", checkpoint=checkpoint(accepted))
    version = ModelVersionRow(
        version=number, parent=number - 1, bundle_digest="sha256:x", created_at=time.time(), weights=weights(number)
    )
    store.complete_round(number, version=version)
    models.save(number, weights(number), {"round": number})


def main(db: Path, models_dir: Path, stop: Path, max_rounds: int) -> None:
    store, models = SqliteServerStore.open(db), ModelStore(models_dir)
    store.put_model_version(
        ModelVersionRow(version=0, parent=None, bundle_digest="sha256:x", created_at=time.time(), weights=weights(0))
    )
    models.save(0, weights(0), {"round": None})
    deadline = time.monotonic() + 60.0
    for number in range(1, max_rounds + 1):
        run_round(store, models, number)
        if number == 1:
            print("ready", flush=True)
        if stop.exists() or time.monotonic() > deadline:
            break
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
