"""Backend fixtures: every contract test runs against SQLite and against a real PostgreSQL.

PostgreSQL is one throw-away cluster per session (:class:`PostgresProcess`: ``initdb`` into a
temp directory, ``postgres`` on a Unix socket there, as ``nobody`` when the tests run as root);
each test gets its own schema in database ``fedflock_test``, so tests never see each other's
rows. Without psycopg or the server binaries the PostgreSQL cases fail with the reason (never a
skip: CI must exercise the real backend; ``.ci/run`` installs it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import (
    AggregateCheckpoint,
    ModelVersionRow,
    PostgresServerStore,
    RoundRow,
    SqliteServerStore,
    SqlServerStore,
    psycopg_available,
)
from broker_server.persistence.postgres_process import PostgresNotInstalled, PostgresProcess, find_postgres_bin

BACKENDS = ("sqlite", "postgres")


class FakeClock:
    """Wall-clock stand-in: starts at 1000.0 and advances 1.0 per reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@dataclass
class Backend:
    """Opens store objects on one fresh database (several objects = several connections)."""

    name: str
    #: arguments for a subprocess to open the same database: ("sqlite", path) or ("postgres", conninfo, schema)
    spec: tuple[str, ...]
    opener: Callable[[FakeClock], SqlServerStore]
    clock: FakeClock = field(default_factory=FakeClock)
    opened: list[SqlServerStore] = field(default_factory=list)

    def open(self) -> SqlServerStore:
        store = self.opener(self.clock)
        self.opened.append(store)
        return store


def _unavailable(reason: str) -> None:
    # a failure, never a skip: like Mosquitto, CI must not go green without the real backend
    # (.ci/run installs Debian's postgresql package and the broker extra brings psycopg)
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProcess]:
    if not psycopg_available():
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]>=3.2')")
    try:
        find_postgres_bin()
    except PostgresNotInstalled as exc:
        _unavailable(exc.reason)
    import psycopg

    with PostgresProcess() as server:
        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE fedflock_test")
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "server.db"
        made = Backend("sqlite", ("sqlite", str(path)), lambda clock: SqliteServerStore.open(path, clock=clock))
    else:
        server: PostgresProcess = request.getfixturevalue("postgres_server")
        conninfo, schema = server.conninfo("fedflock_test"), f"t_{uuid.uuid4().hex[:12]}"
        made = Backend(
            "postgres",
            ("postgres", conninfo, schema),
            lambda clock: PostgresServerStore.open(conninfo, schema=schema, clock=clock),
        )
    yield made
    for store in made.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> SqlServerStore:
    return backend.open()


# -- builders ------------------------------------------------------------------------------------


def weights(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.arange(3, dtype=np.float32) * value}


def version_row(version: int, parent: int | None, **kw: object) -> ModelVersionRow:
    fields: dict[str, object] = {"bundle_digest": "sha256:abc", "created_at": 10.0 + version, "weights": weights()}
    fields.update(kw)
    return ModelVersionRow(version=version, parent=parent, **fields)  # type: ignore[arg-type]


def round_row(number: int = 1, tasks: Mapping[str, str] | None = None, model_version: int = 0) -> RoundRow:
    return RoundRow(
        round=number,
        model_version=model_version,
        tasks=dict(tasks) if tasks is not None else {"t1": "d1", "t2": "d2", "t3": "d3", "t4": "d4"},
        deadline=5000.0 + number,
        created_at=100.0 + number,
        config={"codecs": ["fp32", "int8"], "lr": 0.05, "hyperparameters": {"fedprox_mu": 0.01}},
    )


def contribution(task_id: str) -> tuple[dict[str, np.ndarray], float]:
    """A distinct (delta, weight) per task, deterministic."""
    seed = sum(task_id.encode())
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}, float(1 + seed % 7)


def checkpoint(task_ids: list[str]) -> AggregateCheckpoint:
    """The checkpoint after folding in ``task_ids``' contributions (as WeightedMean would)."""
    sums = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    total = 0.0
    for task_id in task_ids:
        delta, weight = contribution(task_id)
        for name in sums:
            sums[name] += weight * delta[name]
        total += weight
    return AggregateCheckpoint(
        sums=sums if task_ids else {},
        total_weight=total,
        count=len(task_ids),
        accepted=frozenset(task_ids),
        metric_sums={"train_loss": 0.5 * total},
    )


def assert_checkpoint_equal(got: AggregateCheckpoint, want: AggregateCheckpoint) -> None:
    assert got.accepted == want.accepted
    assert got.count == want.count
    assert got.total_weight == want.total_weight
    assert dict(got.metric_sums) == dict(want.metric_sums)
    assert set(got.sums) == set(want.sums)
    for name, value in want.sums.items():
        assert got.sums[name].dtype == np.float64
        np.testing.assert_array_equal(got.sums[name], value)
