"""CFL's ε2 by default: a converged cluster does not split on noise (broker_server.cluster_config).

Six scripted devices of one population train toward one optimum: round r's update is
``0.1 × 0.5^(r-1) × D`` (one direction ``D`` for all, norm ≈ 1 in round 1) plus independent noise
of norm ≈ 0.15 that never goes away (SGD noise, client drift). From round 4 on the mean update is
small next to the largest one (stationary) and the updates' directions are random — exactly what
made ε2 = 0 split a converged cluster. The relative default (half the peak median update norm)
keeps it whole for 20 rounds; an absolute ``min_update_norm`` close to 0 (the old default's
behaviour) splits it.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from broker_server.cluster_config import SPLIT_NORM_RATIO, split_floor
from broker_server.cluster_models import ClusterBook
from broker_server.cluster_rounds import advance
from broker_server.robust import Flattener
from broker_server.server import FederatedServer
from broker_server.strategies import FedAvg
from broker_server.strategies.clustering import ClusterConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import StorageError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, fake_fleet
from tests.broker_server.test_clusters import config

ROUNDS = 20


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def converging_delta(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    common = np.random.default_rng(11)
    noise = np.random.default_rng([zlib.crc32(device_id.encode()), round_])
    scale = 0.1 * 0.5 ** (round_ - 1)
    return {
        s.name: (scale * common.standard_normal(s.shape) + 0.015 * noise.standard_normal(s.shape)).astype(np.float32)
        for s in specs
    }


class ConvergingDevice(FakeDevice):
    def _answer(self, task: TaskMessage) -> None:
        delta = converging_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            nonce=task.nonce,
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def federate(bundle: Bundle, clusters: dict[str, object]) -> ClusterBook:
    broker = InMemoryBroker()
    devices = [ConvergingDevice(broker, f"d-{i}", bundle, num_examples=10 + 5 * i) for i in range(6)]
    with fake_fleet(list(devices)):
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            config(ROUNDS, clients_per_round=6, min_clients=6, min_reports=6, clusters=clusters),
        )
        server.start()
        try:
            server.wait_for_devices(6, 10)
            results = server.run()
        finally:
            server.close()
    assert [r.completed for r in results] == [True] * ROUNDS
    book = server.clusters
    assert book is not None
    return book


def test_a_converged_cluster_of_one_population_does_not_split_on_noise(bundle: Bundle) -> None:
    book = federate(bundle, {})
    assert sorted(book.models) == [0], book.assignments.to_json()
    # the peak is round 1's median update norm (≈ 1), the noise (≈ 0.15) stays below half of it
    assert 0.8 < book.root.peak_norm < 1.3
    # with ε2 ≈ 0, as the old default, the same updates split the cluster once it is stationary
    noisy = federate(bundle, {"min_update_norm": 1e-9})
    assert len(noisy.models) > 1


def test_the_split_floor_is_min_update_norm_or_half_the_peak() -> None:
    assert SPLIT_NORM_RATIO == 0.5
    assert split_floor(0.0, 3.0) == 1.5  # default: relative
    assert split_floor(0.2, 3.0) == 0.2  # an absolute ε2 when given


def test_the_peak_norm_grows_with_the_largest_median_and_split_off_clusters_inherit_it() -> None:
    specs = (TensorSpec(name="w", shape=(3,), dtype="float32", role="parameter", trainable=True, aggregate=True),)
    flattener = Flattener.from_specs(specs)
    book = ClusterBook.root_only({"w": np.zeros(3, np.float32)}, FedAvg(), federation_version=0)
    ids = ["a", "b", "c", "d"]
    cfg = ClusterConfig()

    def step(book: ClusterBook, rows: list[list[float]], number: int) -> ClusterBook:
        matrix = np.array(rows, dtype=np.float32)
        made = advance(book, matrix, np.ones(4), ids, config=cfg, flattener=flattener, round=number, plain=frozenset())
        return made.book

    # round 1: norms 2, 2, 4, 4 (median 3), all along +x: not stationary, no split; peak 3
    book = step(book, [[2, 0, 0], [2, 0, 0], [4, 0, 0], [4, 0, 0]], 1)
    assert sorted(book.models) == [0] and book.root.peak_norm == pytest.approx(3.0)
    # round 2: a, b along +y, c, d along -y, norm 1 (median 1 < 3): stationary and two clear groups,
    # but the largest update (1) is below half the peak (1.5): no split, the peak stays 3
    book = step(book, [[0, 1, 0], [0, 1, 0], [0, -1, 0], [0, -1, 0]], 2)
    assert sorted(book.models) == [0] and book.root.peak_norm == pytest.approx(3.0)
    # round 3: the same conflict with norm 2 (>= 1.5): it splits; both parts keep the peak 3
    book = step(book, [[0, 2, 0], [0, 2, 0], [0, -2, 0], [0, -2, 0]], 3)
    assert sorted(book.models) == [0, 1] and book.members(1) == ("c", "d")
    assert book.models[0].peak_norm == book.models[1].peak_norm == pytest.approx(3.0)
    # the peak is stored with the clusters; a book stored before it was kept loads with 0
    raw = json.loads(json.dumps(book.to_json()))
    assert ClusterBook.from_json(raw, FedAvg()).models[1].peak_norm == pytest.approx(3.0)
    for item in raw["clusters"]:
        del item["peak_norm"]
    assert ClusterBook.from_json(raw, FedAvg()).models[1].peak_norm == 0.0
    raw["clusters"][0]["peak_norm"] = -1
    with pytest.raises(StorageError, match="peak_norm"):
        ClusterBook.from_json(raw, FedAvg())
