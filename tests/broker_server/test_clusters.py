"""Clustered FL in the running sync server, with scripted devices whose updates are known exactly.

Group A's devices send ``+base(round) + small noise``, group B's ``-base(round) + noise``, so the
root cluster's mean update is small next to each member's (stationary) and the two groups point in
opposite directions: round 1 splits the root, and from then on each group trains its own model,
which must equal the hand-computed FedAvg of its members' updates.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.cluster_models import ClusterBook
from broker_server.ops.status import build_status
from broker_server.persistence import SqliteServerStore
from broker_server.server import FederatedServer, ServerConfig
from broker_server.strategies import FedAdam, FedAvg
from broker_server.strategies.clustering import ClusterConfig, check_split
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError, StorageError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, fake_fleet

Tensors = dict[str, np.ndarray]


def directed_delta(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> Tensors:
    """``±base(round) + 0.01 noise``: + for devices named ``a-*`` (and ``new-*``), - for ``b-*``."""
    sign = -1.0 if device_id.startswith("b-") else 1.0
    base = np.random.default_rng([7, round_])
    noise = np.random.default_rng([zlib.crc32(device_id.encode()), round_])
    return {
        s.name: (sign * 0.1 * base.standard_normal(s.shape) + 0.01 * noise.standard_normal(s.shape)).astype(np.float32)
        for s in specs
    }


class DirectedDevice(FakeDevice):
    """A scripted device sending :func:`directed_delta`, bound to its TASK (nonce, weights digest)."""

    def _answer(self, task: TaskMessage) -> None:
        delta = directed_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=self.answered.count(task.task_id),
            nonce=task.nonce,
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def fedavg(devices: list[FakeDevice], round_: int, specs: tuple[TensorSpec, ...]) -> Tensors:
    total = sum(d.num_examples for d in devices)
    sums = {s.name: np.zeros(s.shape, np.float64) for s in specs}
    for device in devices:
        for name, value in directed_delta(device.device_id, round_, specs).items():
            sums[name] += device.num_examples * value.astype(np.float64)
    return {name: value / total for name, value in sums.items()}


def plus(weights: Tensors, delta: Tensors) -> Tensors:
    return {name: weights[name] + delta[name] if name in delta else weights[name] for name in weights}


def assert_weights(actual: Tensors, expected: Tensors) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def config(rounds: int, **kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": rounds,
        "clients_per_round": 7,
        "min_clients": 6,
        "min_reports": 6,
        "wait_for_clients_s": 10,
        "round_timeout_s": 30,
        "codecs": ("fp32",),
        "clusters": {},
        "seed": 1,
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def groups(broker: InMemoryBroker, bundle: Bundle) -> tuple[list[FakeDevice], list[FakeDevice]]:
    a: list[FakeDevice] = [DirectedDevice(broker, f"a-{i}", bundle, num_examples=10 * (i + 1)) for i in range(3)]
    b: list[FakeDevice] = [DirectedDevice(broker, f"b-{i}", bundle, num_examples=10 * (i + 1)) for i in range(3)]
    return a, b


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteServerStore]:
    opened = SqliteServerStore.open(tmp_path / "server.db")
    yield opened
    opened.close()


def test_opposite_groups_split_and_train_their_own_fedavg_models(bundle: Bundle, tmp_path: Path) -> None:
    specs = bundle.manifest.aggregated_tensors
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    with fake_fleet(a + b):
        server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config(3), out_dir=tmp_path / "out")
        server.start()
        try:
            server.wait_for_devices(6, 10)
            w0 = bundle.initial_weights()
            r1 = server.run_round(1)
            book = server.clusters
            assert book is not None and r1.completed and r1.model_version == 1
            # round 1 split the root: the tie goes to the group holding the smallest id (a-0)
            assert book.members(0) == ("a-0", "a-1", "a-2") and book.members(1) == ("b-0", "b-1", "b-2")
            # ... and already trained the two parts apart (CFL's Algorithm 1)
            assert_weights(book.models[0].weights, plus(w0, fedavg(a, 1, specs)))
            assert_weights(book.models[1].weights, plus(w0, fedavg(b, 1, specs)))
            assert book.models[1].parent == (0, 0) and book.models[0].parent == (0, 0)
            after1 = {c: dict(m.weights) for c, m in book.models.items()}

            r2 = server.run_round(2)
            book = server.clusters
            assert book is not None and r2.completed and sorted(book.models) == [0, 1]  # no further split
            # every round-2 TASK carried the weights of its device's cluster
            for device, cluster in [(d, 0) for d in a] + [(d, 1) for d in b]:
                task = device.tasks[-1]
                assert task.round == 2
                for spec in bundle.manifest.shared_model_tensors:
                    np.testing.assert_array_equal(task.weights[spec.name], after1[cluster][spec.name])
            assert_weights(book.models[0].weights, plus(after1[0], fedavg(a, 2, specs)))
            assert_weights(book.models[1].weights, plus(after1[1], fedavg(b, 2, specs)))
            assert (book.models[0].version, book.models[1].version) == (2, 2)
            assert_weights(server.weights, book.models[0].weights)  # the server's model is the root's

            # a device never seen trains the root cluster
            newcomer = DirectedDevice(broker, "new-0", bundle, num_examples=15).start()
            try:
                server.wait_for_devices(7, 10)
                before = {c: dict(m.weights) for c, m in book.models.items()}
                r3 = server.run_round(3)
                assert r3.completed and r3.reported == 7
                np.testing.assert_array_equal(newcomer.tasks[-1].weights[specs[0].name], before[0][specs[0].name])
                book = server.clusters
                assert book is not None and book.assignments.cluster_of("new-0") == 0
                assert_weights(book.models[0].weights, plus(before[0], fedavg([*a, newcomer], 3, specs)))
                assert_weights(book.models[1].weights, plus(before[1], fedavg(b, 3, specs)))
            finally:
                newcomer.stop()
        finally:
            server.close()
    status = build_status(
        config=server.config,
        strategy="fedavg",
        model_version=server.model_version,
        bundle_digest=bundle.digest,
        devices=server.registry.records(),
        rounds=server.results,
        now=0.0,
        clusters=server.cluster_status(),
    )
    assert [(c["cluster_id"], c["members"], c["version"]) for c in status["clusters"]] == [
        (0, 3, 3),
        (1, 3, 3),
    ]  # new-0 is unassigned: in the root
    assert status["clusters"][1]["parent"] == {"cluster_id": 1, "version": 2}
    # per-cluster model files with their lineage
    models = tmp_path / "out" / "models"
    assert sorted(p.name for p in (models / "cluster-0").iterdir()) == [f"v{v:06d}" for v in range(4)]
    assert sorted(p.name for p in (models / "cluster-1").iterdir()) == [f"v{v:06d}" for v in (1, 2, 3)]
    meta = json.loads((models / "cluster-1" / "v000001" / "meta.json").read_text())
    assert meta["parent"] == {"cluster": 0, "version": 0} and meta["federation_version"] == 1
    assert meta["members"] == ["b-0", "b-1", "b-2"]


def test_a_restarted_server_continues_the_clusters(bundle: Bundle, store: SqliteServerStore, tmp_path: Path) -> None:
    specs = bundle.manifest.aggregated_tensors
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    with fake_fleet(a + b):
        first = FederatedServer(InMemoryTransport(broker, "server-1"), bundle, config(2), store=store)
        first.start()
        try:
            first.wait_for_devices(6, 10)
            assert all(r.completed for r in first.run())
        finally:
            first.close()
        stored = first.clusters
        assert stored is not None and sorted(stored.models) == [0, 1]

        second = FederatedServer(InMemoryTransport(broker, "server-2"), bundle, config(3), store=store)
        second.start()
        try:
            restored = second.clusters
            assert restored is not None and second.model_version == 2 and second.next_round == 3
            assert restored.assignments.to_json() == stored.assignments.to_json()
            for cluster_id, model in stored.models.items():
                assert restored.models[cluster_id].version == model.version
                assert_weights(restored.models[cluster_id].weights, model.weights)
            results = second.run()
        finally:
            second.close()
    assert [r.round for r in results] == [3] and results[0].completed
    book = second.clusters
    assert book is not None
    assert_weights(book.models[0].weights, plus(stored.models[0].weights, fedavg(a, 3, specs)))
    assert_weights(book.models[1].weights, plus(stored.models[1].weights, fedavg(b, 3, specs)))


def test_evaluation_runs_per_cluster_and_the_round_reports_their_mean(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    a, b = groups(broker, bundle)
    seen: list[float] = []

    def evaluate(weights: Tensors) -> object:
        from edge_agent.runtime.trainer import EvalResult

        score = float(np.sum(weights[bundle.manifest.aggregated_tensors[0].name]))
        seen.append(score)
        return EvalResult(num_examples=1, loss=score, accuracy=score)

    with fake_fleet(a + b):
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            config(1),
            evaluator=evaluate,  # type: ignore[arg-type]
        )
        server.start()
        try:
            server.wait_for_devices(6, 10)
            (result,) = server.run()
        finally:
            server.close()
    book = server.clusters
    assert book is not None
    per_cluster = {str(c): m.test_accuracy for c, m in book.models.items()}
    assert len(seen) == 3  # version 0, then each of the two clusters the round made
    assert result.cluster_accuracy == per_cluster and len(per_cluster) == 2
    assert result.test_accuracy == pytest.approx(np.mean(list(per_cluster.values())))


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"mode": "async"}, "mode"),
        ({"late_updates": "async"}, "late_updates"),
        ({"robust": {"rule": "median"}}, "robust"),
        ({"trust": {}}, "trust"),
        ({"clusters": {"max_devices": 6}}, "max_devices"),
        ({"clusters": {"stationarity": 0}}, "stationarity"),
        ({"clusters": {"min_update_norm": -1}}, "min_update_norm"),
        ({"clusters": {"splits": 2}}, "splits"),
    ],
)
def test_unsupported_combinations_and_bad_keys_are_refused_by_name(extra: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config(1, **extra)


def test_the_split_test_follows_cfl() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(50)
    opposite = np.stack([base + 0.01 * rng.standard_normal(50) for _ in range(2)] + [-base, -base * 1.1])
    check = check_split(opposite.astype(np.float32), np.ones(4), ClusterConfig())
    assert check.labels is not None and check.labels.tolist() == [0, 0, 1, 1] and check.reason == ""
    aligned = np.stack([base, base * 1.2, base * 0.9]).astype(np.float32)
    kept = check_split(aligned, np.ones(3), ClusterConfig())
    assert kept.labels is None and "not stationary" in kept.reason
    assert kept.mean_norm == pytest.approx(np.linalg.norm(base) * (1 + 1.2 + 0.9) / 3, rel=1e-5)
    small = check_split(opposite.astype(np.float32), np.ones(4), ClusterConfig(min_update_norm=1e3))
    assert small.labels is None and "min_update_norm" in small.reason
    assert check_split(opposite[:1].astype(np.float32), np.ones(1), ClusterConfig()).labels is None


def test_the_cluster_book_round_trips_with_strategy_state_and_refuses_junk() -> None:
    strategy = FedAdam()
    weights = {"w": np.arange(4, dtype=np.float32)}
    strategy.apply(weights, {"w": np.ones(4, np.float32)}, round=1)
    book = ClusterBook.root_only(weights, strategy, federation_version=3)
    book.assignments.split(0, ["x", "y"], [0, 1])
    book.models[1] = book.root.fork(1)
    raw = json.loads(json.dumps(book.to_json()))
    again = ClusterBook.from_json(raw, FedAdam())
    assert again.assignments.to_json() == book.assignments.to_json() and again.federation_version == 3
    assert again.models[1].parent == (0, 0)
    state, restored = strategy.state(), again.models[1].strategy.state()
    assert state.meta == restored.meta
    for name, value in state.tensors.items():
        np.testing.assert_array_equal(restored.tensors[name], value)
    with pytest.raises(StorageError, match="strategy"):
        ClusterBook.from_json(raw, FedAvg())
    raw["clusters"] = raw["clusters"][:1]
    with pytest.raises(StorageError, match="no model"):
        ClusterBook.from_json(raw, FedAdam())
