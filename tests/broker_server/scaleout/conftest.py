"""The real PostgreSQL of the persistence tests (one throw-away cluster per session; a failure,
never a skip, without it), and a fresh store schema per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from broker_server.persistence import ModelVersionRow, PostgresServerStore, RoundRow
from broker_server.persistence.postgres_process import PostgresProcess
from tests.broker_server.persistence.conftest import postgres_server  # noqa: F401

TASKS = {"t1": "d1", "t2": "d2", "t3": "d3", "t4": "d4"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def open_store(postgres_server: PostgresProcess) -> Iterator[object]:  # noqa: F811
    """``open_store()``: another connection (store object) to this test's fresh schema."""
    conninfo, schema = postgres_server.conninfo("fedflock_test"), f"s_{uuid.uuid4().hex[:12]}"
    opened: list[PostgresServerStore] = []

    def opener() -> PostgresServerStore:
        store = PostgresServerStore.open(conninfo, schema=schema, clock=Clock())
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def seed_round(store: PostgresServerStore, number: int = 1, tasks: dict[str, str] = TASKS) -> None:
    """Version 0 and an open round ``number`` with ``tasks``, as the coordinator creates them."""
    if not store.model_versions():
        weights = {"w": np.zeros((2, 3), np.float32)}
        store.put_model_version(
            ModelVersionRow(version=0, parent=None, bundle_digest="sha256:x", created_at=1.0, weights=weights)
        )
    store.create_round(RoundRow(round=number, model_version=0, tasks=tasks, deadline=9e9, created_at=2.0))
