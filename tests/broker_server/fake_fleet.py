"""Scripted devices for server tests, and a small bundle with BatchNorm buffers and FedProx.

A :class:`FakeDevice` speaks the real protocol over the in-memory transport (retained STATUS with
capabilities and eligibility, TASK in, UPDATE out) but does not train: its update for a round is a
fixed function of its id and the round (:func:`device_delta`), so tests can compute the expected
aggregate by hand. It can *hold* tasks (answer them when released, like a slow device) or be
*deaf* (ignore them, like a device whose TASK got lost).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.presence import offline_will
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import StatusMessage, TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport


def export_mlp_bundle(directory: Path) -> Bundle:
    """An MLP with BatchNorm (running mean/var are aggregated buffers) taking ``fedprox_mu`` (~3 s)."""
    import torch
    from torch import nn

    from model_export import export_bundle
    from model_export.federated import FederatedSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    path = export_bundle(
        model, input_shape=(4,), num_classes=3, out_dir=directory, lr=0.1, federated=FederatedSpec(fedprox_mu=0.0)
    )
    return Bundle.open(path)


def device_delta(device_id: str, round_: int, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """The update ``device_id`` sends in round ``round_``: small, deterministic, different per device."""
    rng = np.random.default_rng([zlib.crc32(device_id.encode()), round_])
    return {s.name: (0.05 * rng.standard_normal(s.shape)).astype(np.float32) for s in specs}


class FakeDevice:
    def __init__(
        self,
        broker: InMemoryBroker,
        device_id: str,
        bundle: Bundle,
        *,
        num_examples: int = 10,
        device_class: str | None = None,
        declines: bool = False,
        hold: bool = False,
        deaf: bool = False,
        topics: Topics = Topics(),
    ) -> None:
        self.device_id, self.num_examples, self.topics = device_id, num_examples, topics
        self.bundle = bundle
        self.device_class, self.declines = device_class, declines
        #: every TASK received, in order (also ignored and held ones)
        self.tasks: list[TaskMessage] = []
        #: task ids answered, one entry per UPDATE sent
        self.answered: list[str] = []
        self._transport = InMemoryTransport(broker, device_id, will=offline_will(device_id, topics))
        self._held: list[TaskMessage] = []
        self._hold, self._deaf = threading.Event(), threading.Event()
        if hold:
            self._hold.set()
        if deaf:
            self._deaf.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=device_id, daemon=True)

    def start(self) -> FakeDevice:
        self._transport.start()
        self._transport.subscribe(self.topics.tasks(self.device_id))
        capabilities = {"device_class": self.device_class} if self.device_class else {}
        eligibility = {"eligible": False, "phase": "train", "reasons": []} if self.declines else {}
        status = StatusMessage(
            device_id=self.device_id,
            online=True,
            bundle_digest=self.bundle.digest,
            num_examples=self.num_examples,
            capabilities=capabilities,
            eligibility=eligibility,
        )
        self._transport.publish(self.topics.status(self.device_id), encode_message(status), retain=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Answer held tasks now and every later one at once; a deaf device starts listening."""
        self._deaf.clear()
        with self._lock:
            self._hold.clear()
            held, self._held = self._held, []
        for task in held:
            self._answer(task)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._transport.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            inbound = self._transport.receive(timeout=0.02)
            if inbound is None:
                continue
            task = decode_message(inbound.payload)
            assert isinstance(task, TaskMessage), task
            self.tasks.append(task)
            if self._deaf.is_set():
                continue
            with self._lock:
                if self._hold.is_set():
                    self._held.append(task)
                    continue
            self._answer(task)

    def _answer(self, task: TaskMessage) -> None:
        delta = device_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)
        self.answered.append(task.task_id)
        update = UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            metrics={"train_loss": 1.0 / self.num_examples},
            codec="fp32",
            payload=encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=self.answered.count(task.task_id),
            nonce=task.nonce,  # update binding: echo the TASK's nonce and payload digest
            base_digest=task.weights_digest,
        )
        self._transport.publish(self.topics.results(self.device_id), encode_message(update))


@contextmanager
def fake_fleet(devices: list[FakeDevice]) -> Iterator[list[FakeDevice]]:
    for device in devices:
        device.start()
    try:
        yield devices
    finally:
        for device in devices:
            device.stop()


def expected_mean(devices: list[FakeDevice], round_: int, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """The example-weighted mean of ``devices``' round ``round_`` updates, computed independently."""
    total = sum(d.num_examples for d in devices)
    sums = {s.name: np.zeros(s.shape, np.float64) for s in specs}
    for device in devices:
        for name, value in device_delta(device.device_id, round_, specs).items():
            sums[name] += device.num_examples * value.astype(np.float64)
    return {name: (value / total).astype(np.float32) for name, value in sums.items()}
