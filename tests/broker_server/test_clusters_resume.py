"""A clustered round interrupted by a crash resumes through the refill path, each cluster intact.

As in ``test_server_robust_resume.py`` the crash is simulated in process: the first server
collects in a thread whose clock raises once told to (nothing completed or abandoned, like
SIGKILL), and a new server opens the same SQLite store file. The devices are scripted
(``test_clusters.DirectedDevice``: group a pushes ``+base(round)``, group b ``-base(round)``) and
answer every TASK they hear, a re-sent one with the same update, like an agent answering a known
task id from its outbox. Round 1 splits the root into the two groups; round 2 is interrupted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.cluster_models import setting_key
from broker_server.persistence import SqliteServerStore
from broker_server.server import FederatedServer
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, fake_fleet
from tests.broker_server.test_clusters import assert_weights, config, fedavg, groups, plus

Tensors = dict[str, np.ndarray]
#: every device must report: the round cannot complete without the one that missed its TASK
SETTINGS: dict[str, object] = {"clients_per_round": 6, "min_clients": 6, "min_reports": 6}


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


class CrashingStore(SqliteServerStore):
    """The real SQLite store, dying (like the process) in ``complete_round`` once told to: after the
    round's clusters were written as a setting, before its model version commits."""

    crash_on_complete = False

    def complete_round(self, round_: int, **kw: Any) -> None:
        if self.crash_on_complete:
            raise SimulatedCrash
        super().complete_round(round_, **kw)


class SimulatedCrash(Exception):
    pass


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def split_then_crash(bundle: Bundle, broker: InMemoryBroker, path: Path, deaf: FakeDevice, **settings: object) -> dict:
    """Round 1 splits the root; round 2 runs until the store file holds 5 of its 6 updates (``deaf``
    missed its TASK), then the server dies. Returns the clusters' weights after round 1."""
    crash = threading.Event()

    def clock() -> float:
        if crash.is_set():
            raise SimulatedCrash
        return time.monotonic()

    store = SqliteServerStore.open(path)
    transport = InMemoryTransport(broker, "first")
    first = FederatedServer(transport, bundle, config(2, **{**SETTINGS, **settings}), store=store, clock=clock)
    first.start()
    first.wait_for_devices(6, 10)
    assert first.run_round(1).completed
    book = first.clusters
    assert book is not None and sorted(book.models) == [0, 1]
    after1 = {c: dict(m.weights) for c, m in book.models.items()}
    deaf._deaf.set()  # its round-2 TASK gets lost

    def run() -> None:
        with contextlib.suppress(SimulatedCrash):  # ends the thread like SIGKILL: nothing closed
            first.run_round(2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: (store.last_round() or 0) >= 2 and len(store.load_round(2).accepted) == 5)
    crash.set()
    thread.join(timeout=10)
    transport.kill()
    store.close()
    return after1


def resume(bundle: Bundle, broker: InMemoryBroker, path: Path, rounds: int, **settings: object) -> FederatedServer:
    """A new server on the same store file; runs the stored round and the rest up to ``rounds``."""
    store = SqliteServerStore.open(path)
    server = FederatedServer(
        InMemoryTransport(broker, "second"), bundle, config(rounds, **{**SETTINGS, **settings}), store=store
    )
    server.start()
    try:
        assert server.resumable_round == 2 and server.model_version == 1
        server.run()
    finally:
        server.close()
        store.close()
    return server


def test_a_crashed_clustered_round_resumes_and_each_cluster_gets_its_members_mean(
    bundle: Bundle, tmp_path: Path
) -> None:
    specs = bundle.manifest.aggregated_tensors
    path = tmp_path / "server.db"
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    with fake_fleet(a + b):
        after1 = split_then_crash(bundle, broker, path, deaf=b[2])
        with SqliteServerStore.open(path) as store:
            assert store.open_rounds() == [2] and store.model_versions() == [0, 1]
        b[2].release()
        second = resume(bundle, broker, path, rounds=3)
    results = second.results
    assert [(r.round, r.completed, r.reported, r.failed, r.model_version) for r in results] == [
        (2, True, 6, 0, 2),
        (3, True, 6, 0, 3),
    ]
    book = second.clusters
    assert book is not None and sorted(book.models) == [0, 1]  # still the two groups
    after2 = {0: plus(after1[0], fedavg(a, 2, specs)), 1: plus(after1[1], fedavg(b, 2, specs))}
    assert_weights(book.models[0].weights, plus(after2[0], fedavg(a, 3, specs)))
    assert_weights(book.models[1].weights, plus(after2[1], fedavg(b, 3, specs)))
    assert (book.models[0].version, book.models[1].version) == (3, 3)
    # the five stored updates were sent again (once per server) and counted once
    round2 = [[t for t in d.tasks if t.round == 2] for d in a + b]
    assert [len(tasks) for tasks in round2] == [2, 2, 2, 2, 2, 2]
    assert [d.answered.count(tasks[0].task_id) for d, tasks in zip(a + b, round2, strict=True)] == [2, 2, 2, 2, 2, 1]
    for device, tasks in zip(a + b, round2, strict=True):  # the same cluster weights, under the stored nonce
        assert tasks[0].nonce == tasks[1].nonce and tasks[0].weights_digest == tasks[1].weights_digest, device
        np.testing.assert_array_equal(tasks[1].weights[specs[0].name], after1[0 if device in a else 1][specs[0].name])
    with SqliteServerStore.open(path) as store:
        snapshot = store.load_round(2)
        assert snapshot.round.status == "completed" and len(snapshot.accepted) == 6
        assert store.model_versions() == [0, 1, 2, 3] and store.get_setting(setting_key(3)) is not None


def test_a_crash_between_the_clusters_and_the_version_applies_the_round_once(bundle: Bundle, tmp_path: Path) -> None:
    """FedAdam steps per cluster: a round applied twice would show in its moments and weights."""
    settings = {"strategy": {"name": "fedadam"}}
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    with fake_fleet(a + b):
        reference = FederatedServer(
            InMemoryTransport(broker, "reference"), bundle, config(2, **{**SETTINGS, **settings})
        )
        reference.start()
        try:
            reference.wait_for_devices(6, 10)
            assert [r.completed for r in reference.run()] == [True, True]
        finally:
            reference.close()

        path = tmp_path / "server.db"
        crashing = CrashingStore(path)
        crashing.start()
        first = FederatedServer(
            InMemoryTransport(broker, "first"), bundle, config(2, **{**SETTINGS, **settings}), store=crashing
        )
        first.start()
        first.wait_for_devices(6, 10)
        assert first.run_round(1).completed
        crashing.crash_on_complete = True
        with pytest.raises(SimulatedCrash):
            first.run_round(2)
        first.close()
        crashing.close()
        with SqliteServerStore.open(path) as store:  # round 2's clusters were written, its version was not
            assert store.get_setting(setting_key(2)) is not None and store.model_versions() == [0, 1]
        second = resume(bundle, broker, path, rounds=2, **settings)
    assert [(r.round, r.completed, r.model_version) for r in second.results] == [(2, True, 2)]
    expected, book = reference.clusters, second.clusters
    assert expected is not None and book is not None
    assert book.assignments.to_json() == expected.assignments.to_json()
    for cluster_id, model in expected.models.items():
        assert book.models[cluster_id].version == model.version == 2
        assert_weights(book.models[cluster_id].weights, model.weights)
        state, restored = model.strategy.state(), book.models[cluster_id].strategy.state()
        assert restored.meta == state.meta
        for name, value in state.tensors.items():
            np.testing.assert_allclose(restored.tensors[name], value, rtol=1e-6, atol=1e-9)


def test_a_stored_update_not_resent_by_the_deadline_is_left_out_of_its_cluster(bundle: Bundle, tmp_path: Path) -> None:
    specs = bundle.manifest.aggregated_tensors
    path = tmp_path / "server.db"
    settings = {"min_reports": 4, "round_timeout_s": 3}
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    with fake_fleet(a + b):
        after1 = split_then_crash(bundle, broker, path, deaf=b[2], **settings)
        a[0]._deaf.set()  # gone with the first server: its stored update never comes back (b-2 stays deaf)
        second = resume(bundle, broker, path, rounds=2, **settings)
    # 4 updates counted (a-0's left out: failed; b-2 never answered): 20 + 30 + 10 + 20 examples
    counted = [(r.round, r.completed, r.reported, r.failed, r.num_examples) for r in second.results]
    assert counted == [(2, True, 4, 1, 80)]
    book = second.clusters
    assert book is not None
    assert_weights(book.models[0].weights, plus(after1[0], fedavg(a[1:], 2, specs)))
    assert_weights(book.models[1].weights, plus(after1[1], fedavg(b[:2], 2, specs)))
