"""A server with a store survives a crash: the open round resumes and nothing is counted twice.

The crash is simulated in process: the server runs its round in a thread whose clock raises once
told to, so the server dies mid-collect without completing or abandoning anything (as SIGKILL
would leave the store); a new server object then opens the same SQLite file.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.persistence import ModelVersionRow, RoundRow, ServerStore, SqliteServerStore, StorageError
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.errors import ConfigError
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, expected_mean, fake_fleet


class SimulatedCrash(Exception):
    pass


class CrashableClock:
    def __init__(self) -> None:
        self.crash = threading.Event()

    def __call__(self) -> float:
        if self.crash.is_set():
            raise SimulatedCrash
        return time.monotonic()


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[str], SqliteServerStore]]:
    opened: list[SqliteServerStore] = []

    def open_store(name: str) -> SqliteServerStore:
        opened.append(SqliteServerStore.open(tmp_path / name))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": 1,
        "clients_per_round": 3,
        "min_clients": 3,
        "min_reports": 3,
        "wait_for_clients_s": 10,
        "round_timeout_s": 60,
        "codecs": ("fp32",),
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def accepted(store: ServerStore, round_: int) -> int:
    return len(store.load_round(round_).accepted) if (store.last_round() or 0) >= round_ else 0


def in_thread(target: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(SimulatedCrash):  # the simulated crash ends the thread, like SIGKILL
            target()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_crashed_round_resumes_and_completes_with_the_uninterrupted_mean(bundle: Bundle, stores) -> None:
    # uninterrupted: dev-2 is held until two updates are committed, so the order is the same below
    broker = InMemoryBroker()
    fleet = [FakeDevice(broker, f"dev-{i}", bundle, num_examples=n) for i, n in enumerate((7, 11, 23))]
    fleet[2] = FakeDevice(broker, "dev-2", bundle, num_examples=23, hold=True)
    reference_store = stores("reference.db")
    with fake_fleet(fleet):
        reference = FederatedServer(InMemoryTransport(broker, "server"), bundle, config(), store=reference_store)
        reference.start()
        thread = in_thread(reference.run)
        wait_for(lambda: accepted(reference_store, 1) == 2)
        fleet[2].release()
        thread.join(timeout=20)
        reference.close()
    assert reference.results[0].completed and reference.model_version == 1

    # crashed: dev-2 never hears the first server's TASK; the server dies with 2 of 3 committed
    broker = InMemoryBroker()
    fleet = [FakeDevice(broker, f"dev-{i}", bundle, num_examples=n) for i, n in enumerate((7, 11, 23))]
    fleet[2] = FakeDevice(broker, "dev-2", bundle, num_examples=23, deaf=True)
    store = stores("server.db")
    with fake_fleet(fleet):
        clock = CrashableClock()
        first_transport = InMemoryTransport(broker, "server")
        first = FederatedServer(first_transport, bundle, config(), store=store, clock=clock)
        first.start()
        thread = in_thread(first.run)
        wait_for(lambda: accepted(store, 1) == 2 and len(fleet[2].tasks) == 1)
        clock.crash.set()
        thread.join(timeout=10)
        first_transport.kill()
        assert store.open_rounds() == [1] and not thread.is_alive()
        del first

        fleet[2].release()  # it listens now, but only the new server's TASK can reach it
        second = FederatedServer(InMemoryTransport(broker, "server-2"), bundle, config(), store=stores("server.db"))
        second.start()
        assert (second.resumable_round, second.next_round, second.model_version) == (1, 2, 0)
        results = second.run()
        second.close()
    assert [(r.round, r.completed, r.reported, r.selected) for r in results] == [(1, True, 3, 3)]
    assert results[0].num_examples == 7 + 11 + 23
    # dev-2 got the same task twice (first server, ignored; re-sent on resume, answered); the
    # others, whose updates were stored, were not asked again
    assert [t.task_id for t in fleet[2].tasks] == [fleet[2].tasks[0].task_id] * 2
    assert [len(d.tasks) for d in fleet[:2]] == [1, 1]
    for name in reference.weights:
        np.testing.assert_array_equal(second.weights[name], reference.weights[name])
    mean = expected_mean(fleet, 1, bundle.manifest.aggregated_tensors)
    np.testing.assert_allclose(second.weights["0.weight"], bundle.initial_weights()["0.weight"] + mean["0.weight"])
    snapshot = store.load_round(1)
    assert snapshot.round.status == "completed" and snapshot.round.result_version == 1
    assert sorted(t.device_id for t in snapshot.tasks if t.state == "accepted") == ["dev-0", "dev-1", "dev-2"]
    assert snapshot.checkpoint.count == 3 and snapshot.checkpoint.total_weight == 41.0
    version = store.get_model_version(1, weights=False)
    assert version is not None and version.metrics["num_examples"] == 41 and version.parent == 0


def test_a_round_whose_deadline_passed_during_the_outage_closes_with_what_it_has(bundle: Bundle, stores) -> None:
    broker = InMemoryBroker()
    fleet = [FakeDevice(broker, f"dev-{i}", bundle) for i in range(2)]
    fleet.append(FakeDevice(broker, "dev-2", bundle, deaf=True))
    store = stores("server.db")
    with fake_fleet(fleet):
        clock = CrashableClock()
        transport = InMemoryTransport(broker, "server")
        first = FederatedServer(transport, bundle, config(min_reports=2), store=store, clock=clock)
        first.start()
        thread = in_thread(first.run)
        wait_for(lambda: accepted(store, 1) == 2 and len(fleet[2].tasks) == 1)
        clock.crash.set()
        thread.join(timeout=10)
        transport.kill()
        fleet[2].release()
        later = time.time() + 3600  # restarted an hour later: the round's 60 s are over
        second = FederatedServer(
            InMemoryTransport(broker, "server-2"), bundle, config(min_reports=2), store=store, wall_clock=lambda: later
        )
        second.start()
        results = second.run()
        second.close()
    assert [(r.completed, r.reported, r.selected) for r in results] == [(True, 2, 3)]
    assert len(fleet[2].tasks) == 1  # no TASK re-sent for a round that is already over
    assert store.model_versions() == [0, 1]


def test_restart_between_rounds_continues_numbering_and_the_strategy_state(bundle: Bundle, stores) -> None:
    adam = {"name": "fedadam", "server_lr": 0.05}
    broker = InMemoryBroker()
    with fake_fleet([FakeDevice(broker, f"dev-{i}", bundle, num_examples=5 + i) for i in range(3)]):
        uninterrupted = FederatedServer(InMemoryTransport(broker, "ref"), bundle, config(rounds=2, strategy=adam))
        uninterrupted.start()
        uninterrupted.run()
        uninterrupted.close()

        store = stores("server.db")
        first = FederatedServer(InMemoryTransport(broker, "a"), bundle, config(rounds=2, strategy=adam), store=store)
        first.start()
        first.run_round(1)  # then the process stops cleanly between rounds
        first.close()
        second = FederatedServer(
            InMemoryTransport(broker, "b"), bundle, config(rounds=2, strategy=adam), store=stores("server.db")
        )
        second.start()
        assert (second.next_round, second.resumable_round, second.model_version) == (2, None, 1)
        assert second.strategy.state().meta["steps"] == 1  # FedAdam's moments came back
        results = second.run()
        second.close()
    assert [r.round for r in results] == [2] and results[0].completed
    for name in uninterrupted.weights:  # as if it never stopped (only the order of float64 sums may differ)
        np.testing.assert_allclose(second.weights[name], uninterrupted.weights[name], rtol=1e-6, atol=1e-7)
    assert [v.version for v in store.lineage(2)] == [2, 1, 0]
    saved = store.get_strategy_state("fedadam")
    assert saved is not None and saved.round == 2 and saved.state["steps"] == 2


def test_an_open_round_built_on_an_older_model_is_abandoned_on_start(bundle: Bundle, stores) -> None:
    store = stores("server.db")
    weights = bundle.initial_weights()
    for version in (0, 1):
        parent = None if version == 0 else 0
        row = ModelVersionRow(
            version=version, parent=parent, bundle_digest=bundle.digest, created_at=1.0, weights=weights
        )
        store.put_model_version(row)
    store.create_round(RoundRow(round=4, model_version=0, tasks={"t": "d"}, deadline=9e9, created_at=1.0))
    server = FederatedServer(InMemoryTransport(InMemoryBroker(), "s"), bundle, config(rounds=5), store=store)
    server.start()
    server.close()
    assert (server.resumable_round, server.next_round, server.model_version) == (None, 5, 1)
    assert store.open_rounds() == [] and "v1" in store.load_round(4).round.reason


def test_a_store_of_another_bundle_or_given_weights_are_refused(bundle: Bundle, stores) -> None:
    store = stores("server.db")
    row = ModelVersionRow(
        version=0, parent=None, bundle_digest="f" * 64, created_at=1.0, weights=bundle.initial_weights()
    )
    store.put_model_version(row)
    server = FederatedServer(InMemoryTransport(InMemoryBroker(), "s"), bundle, config(), store=store)
    with pytest.raises(ConfigError, match="same bundle"):
        server.start()
    with pytest.raises(ConfigError, match="takes no weights"):
        server.start(bundle.initial_weights())


class FailingStore:
    """A store whose acceptance commits fail (a full disk, a lost database)."""

    def __init__(self, inner: ServerStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def record_acceptance(self, *args: Any, **kw: Any) -> bool:
        raise StorageError("disk full")


def test_a_storage_error_committing_an_update_stops_the_server(bundle: Bundle, stores) -> None:
    broker = InMemoryBroker()
    store = stores("server.db")
    with fake_fleet([FakeDevice(broker, f"dev-{i}", bundle) for i in range(3)]):
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            config(),
            store=FailingStore(store),
        )
        server.start()
        with pytest.raises(StorageError, match="disk full"):
            server.run()
        server.close()
    assert store.open_rounds() == [1] and accepted(store, 1) == 0


def test_the_out_dir_does_not_block_a_resume_but_guards_a_new_federation(bundle: Bundle, stores, tmp_path) -> None:
    broker = InMemoryBroker()
    out = tmp_path / "out"
    with fake_fleet([FakeDevice(broker, f"dev-{i}", bundle) for i in range(3)]):
        first = FederatedServer(
            InMemoryTransport(broker, "a"), bundle, config(rounds=2), out_dir=out, store=stores("server.db")
        )
        first.start()
        first.run_round(1)
        first.close()
        second = FederatedServer(
            InMemoryTransport(broker, "b"), bundle, config(rounds=2), out_dir=out, store=stores("server.db")
        )
        second.start()
        second.run()
        second.close()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["v000000", "v000001", "v000002"]
    assert [line.count('"round"') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    fresh = FederatedServer(InMemoryTransport(broker, "c"), bundle, config(), out_dir=out, store=stores("another.db"))
    with pytest.raises(ConfigError, match="already holds model versions"):
        fresh.start()
