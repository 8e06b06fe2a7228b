"""FedBuff in the running server (mode="async") with scripted devices: hand-computed weights."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.errors import ConfigError, StorageError, TransportError
from edge_agent.protocol.messages import TaskMessage
from edge_agent.protocol.topics import RESULTS
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.async_devices import TOPICS, ScriptedDevice, wait_for

Tensors = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def async_server(broker: InMemoryBroker, bundle: Bundle, table: dict[str, object], **kw: object) -> FederatedServer:
    config = ServerConfig(
        mode="async",
        asynchronous=table,
        codecs=("fp32",),
        wait_for_clients_s=10,
        round_timeout_s=30,
        **kw,  # type: ignore[arg-type]
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config)
    server.start()
    return server


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


def started(devices: list[ScriptedDevice]) -> list[ScriptedDevice]:
    return [d.start() for d in devices]


@pytest.fixture
def running() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=30)


def run_in_background(server: FederatedServer, threads: list[threading.Thread]) -> None:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    threads.append(thread)


def step(
    weights: Tensors,
    parts: list[tuple[ScriptedDevice, int, float]],
    bundle: Bundle,
    bases: dict[int, Tensors] | None = None,
) -> Tensors:
    """``weights`` + the weighted mean of (device, task round, weight) deltas, in float64.

    Buffers (BatchNorm statistics) become the weighted mean of the devices' own values
    ``base + delta``, with ``base`` the weights of the version each task was sent with (``bases``).
    """
    total = sum(w for _, _, w in parts)
    out = {name: np.array(value, dtype=np.float64) for name, value in weights.items()}
    for spec in bundle.manifest.aggregated_tensors:
        acc = np.zeros(spec.shape, dtype=np.float64)
        for device, round_, w in parts:
            task = _task(device, round_)
            value = device.delta(task)[spec.name].astype(np.float64)
            if spec.role != "parameter" and bases is not None:
                value = value + bases[task.model_version][spec.name] - weights[spec.name]
            acc += w * value
        out[spec.name] = out[spec.name] + acc / total
    return out


def _task(device: ScriptedDevice, round_: int) -> TaskMessage:
    return next(t for t in device.tasks if t.round == round_)


def assert_close(actual: Tensors, expected: Tensors, bundle: Bundle) -> None:
    for spec in bundle.manifest.aggregated_tensors:
        np.testing.assert_allclose(actual[spec.name], expected[spec.name], rtol=1e-5, atol=1e-6)


def test_staleness_weights_are_one_over_sqrt_one_plus_s(broker: InMemoryBroker, bundle: Bundle, running) -> None:
    a, b, c = devices = started(
        [
            ScriptedDevice(broker, "dev-a", bundle, num_examples=10),
            ScriptedDevice(broker, "dev-b", bundle, num_examples=20),
            ScriptedDevice(broker, "dev-c", bundle, num_examples=30),
        ]
    )
    server = async_server(broker, bundle, {"buffer_size": 2, "concurrency": 3, "versions": 2}, min_clients=3, rounds=5)
    run_in_background(server, running)
    try:
        for device in devices:
            device.wait_tasks(1)
        assert {d.tasks[0].model_version for d in devices} == {0}
        a.answer(a.tasks[0])  # staleness 0, weight 10; a is idle again: a new TASK on v0
        assert (a.wait_tasks(2)[1].model_version, a.tasks[1].round) == (0, 1)
        b.answer(b.tasks[0])  # staleness 0, weight 20: the buffer is full, v1 = w0 + (10 dA + 20 dB) / 30
        wait_for(lambda: server.model_version == 1)
        v1 = step(bundle.initial_weights(), [(a, 1, 10.0), (b, 1, 20.0)], bundle)
        assert_close(server.weights, v1, bundle)
        assert (b.wait_tasks(2)[1].model_version, b.tasks[1].round) == (1, 2)  # the next buffer's round
        b.answer(b.tasks[1])  # trained on v1, the model is at v1: staleness 0, weight 20
        c.answer(c.tasks[0])  # trained on v0, the model is at v1: staleness 1, weight 30/sqrt(2)
        wait_for(lambda: server.model_version == 2)
    finally:
        for device in devices:
            device.stop()
        server.close()
    w0 = {k: v.astype(np.float64) for k, v in bundle.initial_weights().items()}
    v2 = step(v1, [(b, 2, 20.0), (c, 1, 30 / math.sqrt(2))], bundle, bases={0: w0, 1: v1})
    assert_close(server.weights, v2, bundle)
    assert [(r.round, r.model_version, r.reported, r.completed) for r in server.results] == [
        (1, 1, 2, True),
        (2, 2, 2, True),
    ]
    assert list(server.rejections) == []


def test_max_staleness_refuses_an_update_too_many_versions_behind(
    broker: InMemoryBroker, bundle: Bundle, running
) -> None:
    fast, slow = devices = started([ScriptedDevice(broker, "fast", bundle), ScriptedDevice(broker, "slow", bundle)])
    table = {"buffer_size": 1, "concurrency": 2, "max_staleness": 1, "versions": 3}
    server = async_server(broker, bundle, table, min_clients=2, rounds=5)
    run_in_background(server, running)
    try:
        slow.wait_tasks(1)
        for version in range(2):  # fast makes v1 and v2 alone; slow's task stays on v0
            fast.answer(fast.wait_tasks(version + 1)[version])
            wait_for(lambda v=version: server.model_version == v + 1)
        before = {k: v.copy() for k, v in server.weights.items()}
        slow.answer(slow.tasks[0])  # staleness 2 > 1
        wait_for(lambda: len(server.rejections) == 1)
        assert server.rejections[0].code == "stale" and server.rejections[0].device_id == "slow"
        assert all(np.array_equal(before[k], server.weights[k]) for k in before)
        fast.answer(fast.wait_tasks(3)[2])
        wait_for(lambda: server.model_version == 3)
    finally:
        for device in devices:
            device.stop()
        server.close()
    assert [r.reported for r in server.results] == [1, 1, 1]


def test_no_update_lost_or_counted_twice_with_concurrent_deliveries_and_resends(
    broker: InMemoryBroker, bundle: Bundle, tmp_path: Path, running
) -> None:
    devices = [ScriptedDevice(broker, f"d{i}", bundle, num_examples=5 + i, auto=True, copies=2) for i in range(6)]
    store = SqliteServerStore.open(tmp_path / "server.db")
    config = ServerConfig(
        mode="async",
        asynchronous={"buffer_size": 3, "concurrency": 6, "max_staleness": 20, "versions": 6},
        codecs=("fp32",),
        min_clients=6,
        wait_for_clients_s=10,
        rounds=6,
    )
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, store=store)
    server.start()
    # another thread hands every UPDATE to the server a third time, concurrently with its own loop
    echo = InMemoryTransport(broker, "echo")
    echo.start()
    echo.subscribe(TOPICS.all_devices(RESULTS))
    stop = threading.Event()

    def redeliver() -> None:
        while not stop.is_set():
            inbound = echo.receive(timeout=0.02)
            if inbound is not None:
                server.handle(inbound)

    extra = threading.Thread(target=redeliver, daemon=True)
    extra.start()
    started(devices)
    try:
        results = server.run()
    finally:
        stop.set()
        extra.join(timeout=10)
        echo.close()
        for device in devices:
            device.stop()
        server.close()
    assert [r.model_version for r in results] == [1, 2, 3, 4, 5, 6] and all(r.reported == 3 for r in results)
    by_id = {d.device_id: d for d in devices}
    weights = {name: np.array(value, dtype=np.float64) for name, value in bundle.initial_weights().items()}
    bases = {0: weights}
    counted: list[str] = []
    for version in range(1, 7):
        row = store.get_model_version(version, weights=False)
        assert row is not None and row.parent == version - 1
        parts = []
        for c in row.metrics["contributors"]:
            device = by_id[c["device_id"]]
            task = next(t for t in device.tasks if t.task_id == c["task_id"])
            expected_weight = device.num_examples / math.sqrt(1 + c["staleness"])
            assert c["weight"] == pytest.approx(expected_weight)
            assert task.model_version == version - 1 - c["staleness"]
            parts.append((device, task.round, c["weight"]))
            counted.append(c["task_id"])
        weights = step(weights, parts, bundle, bases=bases)
        bases[version] = weights
    store.close()
    assert len(counted) == len(set(counted)) == 18  # every accepted update in exactly one version
    assert_close(server.weights, weights, bundle)
    # each counted task's two other copies were refused: as duplicates while its buffer was open,
    # as replays once it was sealed (update binding)
    copies = [r for r in server.rejections if r.code in ("duplicate", "replayed")]
    assert len(copies) >= 2 * 18
    assert {r.code for r in server.rejections} <= {"duplicate", "replayed", "finished"}


def test_accepted_updates_survive_a_restart_and_are_not_counted_twice(
    broker: InMemoryBroker, bundle: Bundle, tmp_path: Path, running
) -> None:
    a, b, c = devices = started(
        [ScriptedDevice(broker, n, bundle, num_examples=k) for n, k in (("a", 4), ("b", 6), ("c", 8))]
    )
    table = {"buffer_size": 3, "concurrency": 3, "versions": 1}
    # the first server gets its own connection, closed at the "crash": a thread that outlives it
    # cannot write into the second server's state
    first_store = SqliteServerStore.open(tmp_path / "server.db")
    config = ServerConfig(mode="async", asynchronous=table, codecs=("fp32",), min_clients=3, wait_for_clients_s=10)
    first = FederatedServer(InMemoryTransport(broker, "server-1"), bundle, config, store=first_store)
    first.start()
    crashed: list[BaseException] = []

    def run_until_crash() -> None:
        try:
            first.run()
        except (TransportError, StorageError) as exc:  # closed under it: the simulated crash
            crashed.append(exc)

    worker = threading.Thread(target=run_until_crash, daemon=True)
    worker.start()
    for device in devices:
        device.wait_tasks(1)
    a.answer(a.tasks[0])
    b.answer(b.tasks[0])
    wait_for(lambda: first.asynchronous is not None and first.asynchronous.pending == 2)
    first.close()  # "crash": two accepted updates in the open buffer, c's task outstanding
    first_store.close()
    worker.join(timeout=1)  # its loop only notices when it next sends or stores: not waited for
    assert len(crashed) <= 1
    store = SqliteServerStore.open(tmp_path / "server.db")
    second = FederatedServer(InMemoryTransport(broker, "server-2"), bundle, config, store=store)
    second.start()
    assert second.asynchronous is not None and second.asynchronous.pending == 2
    run_in_background(second, running)
    try:
        b.answer(b.tasks[0], attempt=2)  # re-sent after the restart: a duplicate
        wait_for(lambda: len(second.rejections) == 1)
        c.answer(c.tasks[0])  # a task the first server issued: known through the stored task table
        wait_for(lambda: second.model_version == 1)
    finally:
        for device in devices:
            device.stop()
        second.close()
    store.close()
    assert second.rejections[0].code == "duplicate"
    expected = step(bundle.initial_weights(), [(a, 1, 4.0), (b, 1, 6.0), (c, 1, 8.0)], bundle)
    assert_close(second.weights, expected, bundle)
    assert [(r.round, r.reported) for r in second.results] == [(1, 3)]


def test_async_mode_refuses_a_buffered_robust_rule_and_bad_keys() -> None:
    with pytest.raises(ConfigError, match="mode: 'async' cannot use robust rule median"):
        ServerConfig(mode="async", robust={"rule": "median"})
    with pytest.raises(ConfigError, match=r"asynchronous\.max_staleness"):
        ServerConfig(mode="async", asynchronous={"max_staleness": -1})
    with pytest.raises(ConfigError, match=r"asynchronous\.hinge_a"):
        ServerConfig(mode="async", asynchronous={"hinge_a": 2.0})
    settings = ServerConfig(
        mode="async", rounds=7, round_timeout_s=12, asynchronous={"buffer_size": 4}
    ).fedbuff_settings()
    assert (settings.concurrency, settings.versions, settings.task_timeout_s) == (8, 7, 12.0)
    assert ServerConfig(mode="async", robust={"rule": "clip", "clip": 1.0}).mode == "async"
