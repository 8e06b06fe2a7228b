"""Scripted devices for the asynchronous-server tests: the test decides when each TASK is answered.

A :class:`ScriptedDevice` speaks the real protocol over the in-memory transport (retained STATUS,
TASK in, UPDATE out) without training: its update for a task is
:func:`tests.broker_server.fake_fleet.device_delta` of its id and the TASK's round, so the expected
model can be computed by hand. ``auto`` devices answer every TASK at once (``copies`` times: the
extra copies are QoS-1 style re-sends with a higher attempt number); others keep their TASKs
until :meth:`ScriptedDevice.answer` is called.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.presence import offline_will
from edge_agent.protocol.messages import StatusMessage, TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import device_delta

TOPICS = Topics()


class ScriptedDevice:
    def __init__(
        self,
        broker: InMemoryBroker,
        device_id: str,
        bundle: Bundle,
        *,
        num_examples: int = 10,
        auto: bool = False,
        copies: int = 1,
    ) -> None:
        self.device_id, self.bundle, self.num_examples = device_id, bundle, num_examples
        self.auto, self.copies = auto, copies
        self.tasks: list[TaskMessage] = []
        self._transport = InMemoryTransport(broker, device_id, will=offline_will(device_id, TOPICS))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=device_id, daemon=True)

    def start(self) -> ScriptedDevice:
        self._transport.start()
        self._transport.subscribe(TOPICS.tasks(self.device_id))
        status = StatusMessage(
            device_id=self.device_id, online=True, bundle_digest=self.bundle.digest, num_examples=self.num_examples
        )
        self._transport.publish(TOPICS.status(self.device_id), encode_message(status), retain=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._transport.close()

    def delta(self, task: TaskMessage) -> dict[str, np.ndarray]:
        return device_delta(self.device_id, task.round, self.bundle.manifest.aggregated_tensors)

    def update(self, task: TaskMessage, *, attempt: int = 1) -> UpdateMessage:
        return UpdateMessage(
            device_id=self.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=self.num_examples,
            metrics={"train_loss": 1.0},
            codec="fp32",
            payload=encode_update(self.delta(task), CodecSpec("fp32"), rng=np.random.default_rng(0)),
            attempt=attempt,
            nonce=task.nonce,  # update binding: echo the TASK's nonce and payload digest
            base_digest=task.weights_digest,
        )

    def answer(self, task: TaskMessage, *, attempt: int = 1) -> None:
        self._transport.publish(TOPICS.results(self.device_id), encode_message(self.update(task, attempt=attempt)))

    def wait_tasks(self, count: int, timeout: float = 10.0) -> list[TaskMessage]:
        deadline = time.monotonic() + timeout
        while len(self.tasks) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.tasks) >= count, f"{self.device_id} got {len(self.tasks)} tasks, expected {count}"
        return list(self.tasks)

    def _run(self) -> None:
        while not self._stop.is_set():
            inbound = self._transport.receive(timeout=0.02)
            if inbound is None:
                continue
            task = decode_message(inbound.payload)
            assert isinstance(task, TaskMessage), task
            self.tasks.append(task)
            if self.auto:
                for attempt in range(1, self.copies + 1):
                    self.answer(task, attempt=attempt)


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")
