"""Digits federations under Byzantine attack, through the real server (issue #6).

The whole path is real except the MQTT hop: a :class:`~broker_server.server.FederatedServer`
(round engine, safeguards, robust rule or streaming mean) over the in-memory transport, and one
:class:`TrainingDevice` per shard that decodes its TASK, trains the bundle with onnxruntime
(:class:`~edge_agent.runtime.trainer.OrtTrainer`, the task's epochs, batch size and learning
rate), and sends ``trained - received`` encoded as fp32. A Byzantine device trains too, then
applies its :class:`Attack` to that real update before encoding it.

Training is deterministic per ``(device, round)`` (its shuffling generator is seeded with both),
so a device handed the same weights in the same round computes the same update whatever
federation it belongs to: :class:`TrainingCache` trains each ``(data, round, weights)`` once and
hands the update to every run that asks again (every run's round 1 starts from the bundle's
initial weights, so all runs share it; afterwards their models differ and each trains anew).

Used by ``tests/broker_server/test_byzantine_digits.py`` and ``benchmarks/robust.py``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.server import FederatedServer, ServerConfig
from broker_server.server_config import RoundResult
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.data import Dataset
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import EvalResult, OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from fedflock.datasets import dirichlet_partition, load_digits_arrays, train_test_split
from tests.broker_server.fake_fleet import FakeDevice, fake_fleet

Tensors = dict[str, np.ndarray]

#: the federation every run uses: 10 devices, the first 2 (20 %) Byzantine when attacked
NUM_DEVICES = 10
NUM_BYZANTINE = 2
ROUNDS = 20
EPOCHS = 2
LR = 0.1
BATCH_SIZE = 16
#: Dirichlet concentration of the label split (10: every device holds every digit, unevenly)
ALPHA = 10.0


@dataclass(frozen=True)
class Attack:
    """What a Byzantine device does to its real update ``u`` (``rng`` is seeded per device and round).

    ``gaussian``: ``u + sigma * N(0, 1)`` per element; ``sign_flip``: ``-factor * u``;
    ``scale``: ``factor * u``.
    """

    kind: str
    factor: float

    def apply(self, update: Mapping[str, np.ndarray], rng: np.random.Generator) -> Tensors:
        if self.kind == "gaussian":
            return {n: (v + self.factor * rng.standard_normal(v.shape)).astype(np.float32) for n, v in update.items()}
        if self.kind in ("sign_flip", "scale"):
            sign = -1.0 if self.kind == "sign_flip" else 1.0
            return {n: (sign * self.factor * v).astype(np.float32) for n, v in update.items()}
        raise ValueError(f"unknown attack {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "gaussian":
            return f"Gaussian noise (σ={self.factor:g})"
        return f"sign flip (×−{self.factor:g})" if self.kind == "sign_flip" else f"×{self.factor:g} scaling"


ATTACKS: dict[str, Attack] = {
    "gaussian": Attack("gaussian", 10.0),
    "sign_flip": Attack("sign_flip", 4.0),
    "scale": Attack("scale", 100.0),
}

#: the robust tables compared (Multi-Krum tolerates the 2 attackers and averages 5 updates)
RULES: dict[str, dict[str, Any]] = {
    "median": {"rule": "median"},
    "trimmed_mean": {"rule": "trimmed_mean", "beta": 0.2},
    "multi_krum": {"rule": "krum", "f": NUM_BYZANTINE, "m": 5},
    "clip": {"rule": "clip", "clip": 2.0},
}


def export_digits_mlp(directory: Path) -> Bundle:
    """A 64-32-10 MLP on the 8x8 digits (2,410 parameters; export takes a few seconds)."""
    import torch
    from torch import nn

    from model_export import export_bundle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Bundle.open(export_bundle(model, input_shape=(1, 8, 8), num_classes=10, out_dir=directory, lr=LR))


def digits_task(
    *, num_devices: int = NUM_DEVICES, alpha: float = ALPHA, seed: int = 0
) -> tuple[list[Dataset], Dataset]:
    """Scikit-learn's digits: a stratified 20 % test set, the rest split Dirichlet(``alpha``)."""
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    train, test = train_test_split(y, 0.2, rng)
    parts = dirichlet_partition(y[train], num_devices, alpha, rng, min_size=8)
    return [Dataset(x[train][p], y[train][p]) for p in parts], Dataset(x[test], y[test])


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        digest.update(name.encode())
        digest.update(str((value.dtype.str, value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class TrainingCache:
    """Trains ``(data, seed, round, weights)`` once with one shared trainer; thread-safe."""

    def __init__(self, trainer: OrtTrainer) -> None:
        self.trainer = trainer
        self.trained = 0
        self.reused = 0
        self._updates: dict[tuple[str, int, str], tuple[Tensors, float]] = {}
        self._lock = threading.Lock()

    def update(self, seed: int, task: TaskMessage, data: Dataset, data_key: str) -> tuple[Tensors, float]:
        """``(trained - received for the aggregated tensors, training loss)``; ``data_key`` names ``data``."""
        key = (
            data_key,
            task.round,
            weights_digest(task.weights) + f"/{seed}/{task.epochs}/{task.batch_size}/{task.lr}",
        )
        with self._lock:  # one trainer, one training at a time (they take milliseconds)
            cached = self._updates.get(key)
            if cached is not None:
                self.reused += 1
                return cached
            result = self.trainer.train(
                task.weights,
                data.x,
                data.y,
                epochs=task.epochs,
                batch_size=task.batch_size,
                lr=task.lr,
                rng=np.random.default_rng([seed, task.round]),
            )
            names = [t.name for t in self.trainer.bundle.manifest.aggregated_tensors]
            delta = {n: (result.weights[n] - task.weights[n]).astype(np.float32) for n in names}
            self._updates[key] = (delta, result.loss)
            self.trained += 1
            return delta, result.loss


class TrainingDevice(FakeDevice):
    """A device that really trains (through :class:`TrainingCache`) and may attack its update."""

    def __init__(
        self,
        broker: InMemoryBroker,
        index: int,
        bundle: Bundle,
        *,
        data: Dataset,
        cache: TrainingCache,
        attack: Attack | None = None,
    ) -> None:
        super().__init__(broker, f"dev-{index:02d}", bundle, num_examples=len(data))
        self.index, self.data, self.cache, self.attack = index, data, cache, attack
        #: what the cache knows this device's data by (the same shard in another run hits the cache)
        self.data_key = weights_digest({"x": data.x, "y": data.y})

    def _answer(self, task: TaskMessage) -> None:
        delta, loss = self.cache.update(self.index, task, self.data, self.data_key)
        if self.attack is not None:
            delta = self.attack.apply(delta, np.random.default_rng([1000 + self.index, task.round]))
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
            nonce=task.nonce,  # update binding: echo the TASK's nonce and payload digest
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


def federation_config(robust: Mapping[str, Any], *, rounds: int = ROUNDS) -> ServerConfig:
    return ServerConfig(
        rounds=rounds,
        clients_per_round=NUM_DEVICES,
        min_clients=NUM_DEVICES,
        min_reports=NUM_DEVICES,
        wait_for_clients_s=10,
        round_timeout_s=30,
        local_epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        codecs=("fp32",),
        robust=dict(robust),
    )


def run_federation(
    bundle: Bundle,
    shards: list[Dataset],
    test: Dataset,
    cache: TrainingCache,
    *,
    robust: Mapping[str, Any],
    attack: Attack | None,
    byzantine: int = NUM_BYZANTINE,
    rounds: int = ROUNDS,
) -> list[RoundResult]:
    """One federation: devices ``0 .. byzantine-1`` attack (when ``attack`` is given); every round evaluated."""
    broker = InMemoryBroker()
    devices = [
        TrainingDevice(broker, i, bundle, data=shard, cache=cache, attack=attack if i < byzantine else None)
        for i, shard in enumerate(shards)
    ]

    def evaluate(weights: Tensors) -> EvalResult:
        return cache.trainer.evaluate(weights, test.x, test.y)

    with fake_fleet(list(devices)):
        server = FederatedServer(
            InMemoryTransport(broker, "server"), bundle, federation_config(robust, rounds=rounds), evaluator=evaluate
        )
        server.start()
        try:
            server.wait_for_devices(len(devices), 10)
            return server.run()
        finally:
            server.close()


def final_accuracy(results: list[RoundResult]) -> float:
    """The last round's test accuracy (every round must have completed)."""
    incomplete = [r.round for r in results if not r.completed]
    if incomplete or not results or results[-1].test_accuracy is None:
        raise AssertionError(f"rounds {incomplete} did not complete: {[r.reason for r in results if not r.completed]}")
    return float(results[-1].test_accuracy)


def trainer_for(bundle: Bundle) -> OrtTrainer:
    return OrtTrainer.open(bundle, threads=1)


__all__ = [
    "ATTACKS",
    "RULES",
    "Attack",
    "TrainingCache",
    "TrainingDevice",
    "digits_task",
    "export_digits_mlp",
    "final_accuracy",
    "run_federation",
    "trainer_for",
]
