"""The point of clustered FL, on real training: two populations whose labels conflict.

Eight devices train the digits MLP with onnxruntime through the real server (in-memory
transport, :mod:`tests.broker_server.byzantine_fleet`'s training devices). Devices 4-7 (group B)
see every label shifted by five (``y -> (y + 5) mod 10``): the same images, a contradicting task.
One global FedAvg model cannot serve both groups — it ends poor on at least one group's own
test split — while clustered FL splits the devices by the direction of their updates and each
cluster's model learns its group's task.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.data import Dataset
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.byzantine_fleet import (
    TrainingCache,
    TrainingDevice,
    digits_task,
    export_digits_mlp,
    trainer_for,
)
from tests.broker_server.fake_fleet import fake_fleet

DEVICES = 8
ROUNDS = 12
#: group B's labels: shifted by five
SHIFT = 5


class BoundTrainingDevice(TrainingDevice):
    """A training device that echoes its TASK's nonce and weights digest (update binding)."""

    def _answer(self, task: TaskMessage) -> None:
        delta, loss = self.cache.update(self.index, task, self.data, self.data_key)
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            metrics={"train_loss": loss},
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=self.answered.count(task.task_id),
            nonce=task.nonce,
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def shifted(data: Dataset) -> Dataset:
    return Dataset(data.x, (data.y + SHIFT) % 10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return export_digits_mlp(tmp_path_factory.mktemp("digits-mlp"))


def federate(bundle: Bundle, cache: TrainingCache, shards: list[Dataset], clusters: dict[str, object] | None):
    broker = InMemoryBroker()
    devices = [BoundTrainingDevice(broker, i, bundle, data=shard, cache=cache) for i, shard in enumerate(shards)]
    config = ServerConfig(
        rounds=ROUNDS,
        clients_per_round=DEVICES,
        min_clients=DEVICES,
        min_reports=DEVICES,
        wait_for_clients_s=10,
        round_timeout_s=30,
        local_epochs=2,
        batch_size=16,
        lr=0.1,
        codecs=("fp32",),
        clusters=clusters,
    )
    with fake_fleet(list(devices)):
        server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config)
        server.start()
        try:
            server.wait_for_devices(DEVICES, 10)
            results = server.run()
        finally:
            server.close()
    assert [r.completed for r in results] == [True] * ROUNDS, [r.reason for r in results]
    return server


def test_clusters_learn_conflicting_populations_that_one_global_model_cannot(bundle: Bundle) -> None:
    shards, test = digits_task(num_devices=DEVICES, seed=0)
    shards = shards[: DEVICES // 2] + [shifted(s) for s in shards[DEVICES // 2 :]]
    tests = {"A": test, "B": shifted(test)}
    group = {f"dev-{i:02d}": "A" if i < DEVICES // 2 else "B" for i in range(DEVICES)}
    cache = TrainingCache(trainer_for(bundle))

    def accuracy(weights: dict[str, np.ndarray], name: str) -> float:
        return float(cache.trainer.evaluate(weights, tests[name].x, tests[name].y).accuracy)

    plain = federate(bundle, cache, shards, None)
    global_acc = {name: accuracy(plain.weights, name) for name in tests}

    clustered = federate(bundle, cache, shards, {})
    book = clustered.clusters
    assert book is not None
    by_group = {name: {book.assignments.cluster_of(d) for d, g in group.items() if g == name} for name in tests}
    # CFL separates the populations: no cluster mixes them, and a group whose own model converged
    # is not split further on noise (the default split floor, broker_server/cluster_config.py)
    assert not by_group["A"] & by_group["B"], by_group
    assert len(by_group["A"]) == len(by_group["B"]) == 1, by_group
    device_acc = {d: accuracy(book.model_of(d).weights, g) for d, g in group.items()}
    cluster_acc = {name: min(a for d, a in device_acc.items() if group[d] == name) for name in tests}
    table = {"global": global_acc, "clustered (worst device's cluster)": cluster_acc, "clusters": by_group}
    print(table)
    assert min(cluster_acc.values()) >= 0.85, table
    assert min(global_acc.values()) <= 0.5, table
    assert min(cluster_acc.values()) >= min(global_acc.values()) + 0.35, table
