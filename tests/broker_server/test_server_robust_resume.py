"""A buffered robust round interrupted by a crash resumes: its stored updates are collected again.

The crash is simulated in process as in ``test_server_resume.py``: the first server collects in a
thread whose clock raises once told to (nothing is completed or abandoned, like SIGKILL), and a
new server opens the same SQLite store. The devices are scripted (:class:`ScriptedDevice`): they
answer every TASK they hear, a re-sent one with the same update, like an agent answering a known
task id from its outbox.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.robust import Flattener
from broker_server.server import FederatedServer
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import fake_fleet
from tests.broker_server.test_server_robust import HONEST, ScriptedDevice, attack_delta, config, honest_delta

Tensors = dict[str, np.ndarray]
SETTINGS = {"clients_per_round": 4, "min_clients": 4, "robust": {"rule": "median"}}


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteServerStore]:
    opened = SqliteServerStore.open(tmp_path / "server.db")
    yield opened
    opened.close()


class SimulatedCrash(Exception):
    pass


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def crash_after_three(bundle: Bundle, broker: InMemoryBroker, store: SqliteServerStore, **settings: object) -> None:
    """Run round 1 until the store holds 3 accepted updates, then kill the server mid-round."""
    crash = threading.Event()

    def clock() -> float:
        if crash.is_set():
            raise SimulatedCrash
        return time.monotonic()

    transport = InMemoryTransport(broker, "first")
    first = FederatedServer(transport, bundle, config(**{**SETTINGS, **settings}), store=store, clock=clock)
    first.start()

    def run() -> None:
        with contextlib.suppress(SimulatedCrash):  # ends the thread like SIGKILL: nothing closed
            first.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: (store.last_round() or 0) >= 1 and len(store.load_round(1).accepted) == 3)
    crash.set()
    thread.join(timeout=10)
    transport.kill()


def median_delta(bundle: Bundle, devices: list[str], round_: int, behaviour: Callable = honest_delta) -> np.ndarray:
    specs: tuple[TensorSpec, ...] = bundle.manifest.aggregated_tensors
    flattener = Flattener.from_specs(specs)
    rows = np.stack([flattener.flatten(behaviour(d, round_, specs)).astype(np.float64) for d in devices])
    return np.median(rows, axis=0)


def applied(bundle: Bundle, server: FederatedServer, before: Tensors) -> np.ndarray:
    flattener = Flattener.from_specs(bundle.manifest.aggregated_tensors)
    return flattener.flatten({n: server.weights[n] - before[n] for n in flattener.names}).astype(np.float64)


def fleet(broker: InMemoryBroker, bundle: Bundle) -> list[ScriptedDevice]:
    """Three honest devices that answer at once, and ``late``, which misses the first server's TASK."""
    devices = [ScriptedDevice(broker, d, bundle, honest_delta) for d in HONEST[:3]]
    return [*devices, ScriptedDevice(broker, "late", bundle, honest_delta, deaf=True)]


def test_a_crashed_median_round_resumes_with_its_stored_updates_collected_again(
    bundle: Bundle, store: SqliteServerStore
) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, bundle)
    with fake_fleet(devices):  # type: ignore[arg-type]
        crash_after_three(bundle, broker, store)
        devices[-1].release()
        second = FederatedServer(InMemoryTransport(broker, "second"), bundle, config(**SETTINGS), store=store)
        second.start()
        assert second.resumable_round == 1
        results = second.run()
        second.close()
    assert [(r.round, r.completed, r.reported, r.failed, r.num_examples) for r in results] == [(1, True, 4, 0, 40)]
    ids = [d.device_id for d in devices]
    np.testing.assert_allclose(
        applied(bundle, second, bundle.initial_weights()), median_delta(bundle, ids, 1), atol=1e-6
    )
    # the three stored updates were sent twice (once per server), counted once
    assert [len(d.answered) for d in devices] == [2, 2, 2, 1]
    snapshot = store.load_round(1)
    assert snapshot.round.status == "completed" and len(snapshot.accepted) == 4
    assert store.model_versions() == [0, 1]


def test_an_update_swapped_on_resend_abandons_the_round_with_the_reason(
    bundle: Bundle, store: SqliteServerStore
) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, bundle)
    sent: dict[str, int] = {}

    def swapper(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> Tensors:
        """Honest the first time a round's task is answered, an attack when asked again."""
        key = f"{device_id}/{round_}"
        sent[key] = sent.get(key, 0) + 1
        return honest_delta(device_id, round_, specs) if sent[key] == 1 else attack_delta(device_id, round_, specs)

    devices[0] = ScriptedDevice(broker, HONEST[0], bundle, swapper)
    with fake_fleet(devices):  # type: ignore[arg-type]
        crash_after_three(bundle, broker, store)
        devices[-1].release()
        second = FederatedServer(InMemoryTransport(broker, "second"), bundle, config(**SETTINGS, rounds=1), store=store)
        second.start()
        results = second.run()
        second.close()
    assert [(r.round, r.completed) for r in results] == [(1, False)]
    assert results[0].reason.startswith("server restarted; the re-sent updates differ from those accepted before")
    assert store.load_round(1).round.status == "abandoned" and store.model_versions() == [0]
    assert second.model_version == 0


def test_an_update_not_resent_by_the_deadline_is_left_out_and_the_round_completes(
    bundle: Bundle, store: SqliteServerStore
) -> None:
    broker = InMemoryBroker()
    devices = fleet(broker, bundle)
    settings = {"round_timeout_s": 3, "min_reports": 3}
    with fake_fleet(devices):  # type: ignore[arg-type]
        crash_after_three(bundle, broker, store, **settings)
        devices[0]._deaf.set()  # gone with the first server: its stored update never comes back
        devices[-1].release()
        second = FederatedServer(
            InMemoryTransport(broker, "second"), bundle, config(**SETTINGS, **settings), store=store
        )
        second.start()
        results = second.run()
        second.close()
    assert [(r.round, r.completed, r.reported, r.failed) for r in results] == [(1, True, 3, 1)]
    ids = [d.device_id for d in devices[1:]]
    np.testing.assert_allclose(
        applied(bundle, second, bundle.initial_weights()), median_delta(bundle, ids, 1), atol=1e-6
    )
    assert len(devices[0].answered) == 1
