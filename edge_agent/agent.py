"""The device agent: announce itself, wait for tasks, train with onnxruntime, upload the delta.

The agent never imports torch; it needs onnxruntime, numpy and a :class:`Transport`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent import __version__
from edge_agent.data import Dataset
from edge_agent.errors import FedflockError, ProtocolError
from edge_agent.protocol.messages import (
    ErrorMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.topics import Topics, validate_device_id
from edge_agent.runtime.bundle import check_tensors
from edge_agent.runtime.personal import PersonalStore
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.base import Transport, Will

log = logging.getLogger("fedflock.agent")

#: How many finished results are kept to answer re-delivered tasks (QoS 1 duplicates).
RESULT_CACHE_SIZE = 8


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    device_id: str
    topics: Topics = Topics()
    seed: int = 0
    #: Stop after this many tasks (tests and batch jobs); ``None`` runs until stopped.
    max_tasks: int | None = None
    #: Where the device keeps state across tasks and restarts (its personal tensors);
    #: ``None`` keeps them in memory only.
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)


def offline_will(device_id: str, topics: Topics = Topics()) -> Will:
    """The retained status the broker publishes if the device vanishes."""
    payload = encode_message(StatusMessage(device_id=device_id, online=False, agent_version=__version__))
    return Will(topic=topics.status(device_id), payload=payload, qos=1, retain=True)


def online_birth(device_id: str, bundle_digest: str, num_examples: int, topics: Topics = Topics()) -> Will:
    """The retained status to publish on every (re)connect (MQTT transports' ``birth``)."""
    status = StatusMessage(
        device_id=device_id,
        online=True,
        agent_version=__version__,
        bundle_digest=bundle_digest,
        num_examples=num_examples,
    )
    return Will(topic=topics.status(device_id), payload=encode_message(status), qos=1, retain=True)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        trainer: OrtTrainer,
        data: Dataset,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._transport = transport
        self._trainer = trainer
        self._data = data
        self._clock = clock
        self._rng = np.random.default_rng(config.seed)
        self._results: OrderedDict[str, bytes] = OrderedDict()
        self.tasks_done = 0
        self.personal = PersonalStore(trainer.bundle, config.state_dir)

    def start(self) -> None:
        topics, device_id = self.config.topics, self.config.device_id
        self._transport.start()
        self._transport.subscribe(topics.tasks(device_id), qos=1)
        self._publish_status(online=True)

    def close(self) -> None:
        try:
            self._publish_status(online=False)
        except FedflockError as exc:
            log.warning("%s: could not publish offline status: %s", self.config.device_id, exc)
        self._transport.close()

    def _publish_status(self, *, online: bool) -> None:
        status = StatusMessage(
            device_id=self.config.device_id,
            online=online,
            agent_version=__version__,
            bundle_digest=self._trainer.bundle.digest,
            num_examples=len(self._data),
        )
        self._transport.publish(
            self.config.topics.status(self.config.device_id), encode_message(status), qos=1, retain=True
        )

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Serve tasks until ``stop`` is set or ``max_tasks`` tasks are done."""
        limit = self.config.max_tasks
        while (stop is None or not stop.is_set()) and (limit is None or self.tasks_done < limit):
            inbound = self._transport.receive(timeout=poll_s)
            if inbound is not None:
                self.handle_payload(inbound.payload)

    def handle_payload(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except ProtocolError as exc:
            log.warning("%s: dropped undecodable task (%s): %s", self.config.device_id, exc.code, exc)
            return
        if not isinstance(message, TaskMessage) or message.device_id != self.config.device_id:
            log.warning("%s: dropped %s not addressed to this device", self.config.device_id, type(message).__name__)
            return
        cached = self._results.get(message.task_id)
        if cached is None:
            cached = encode_message(self.execute(message))
            self._results[message.task_id] = cached
            while len(self._results) > RESULT_CACHE_SIZE:
                self._results.popitem(last=False)
            self.tasks_done += 1
        else:
            log.info("%s: task %s delivered again; re-sending its result", self.config.device_id, message.task_id)
        self._transport.publish(self.config.topics.results(self.config.device_id), cached, qos=1)

    def execute(self, task: TaskMessage) -> UpdateMessage | ErrorMessage:
        """Train on the local data for one task; failures become an ERROR message, not a crash."""
        try:
            return self._train(task)
        except FedflockError as exc:
            log.error("%s: task %s failed (%s): %s", task.device_id, task.task_id, exc.code, exc)
            return ErrorMessage(
                device_id=task.device_id, round=task.round, task_id=task.task_id, code=exc.code, reason=exc.reason
            )

    def _train(self, task: TaskMessage) -> UpdateMessage:
        bundle = self._trainer.bundle
        if task.bundle_digest != bundle.digest:
            raise ProtocolError(f"task wants bundle {task.bundle_digest[:12]}…, device has {bundle.digest[:12]}…")
        started = self._clock()
        # Personal tensors come from the device's own copy; a server that sends them is ignored.
        shared = {t.name: task.weights[t.name] for t in bundle.manifest.shared_model_tensors if t.name in task.weights}
        check_tensors(bundle.manifest, shared, names=[t.name for t in bundle.manifest.shared_model_tensors])
        weights = shared | self.personal.load()
        result = self._trainer.train(
            weights,
            self._data.x,
            self._data.y,
            epochs=task.epochs,
            batch_size=task.batch_size,
            lr=task.lr,
            rng=self._rng,
            hyperparameters=task.hyperparameters,
            frozen=task.frozen,
        )
        evaluation = self._trainer.evaluate(result.weights, self._data.x, self._data.y)
        self.personal.save(result.weights)
        aggregated = [t.name for t in bundle.manifest.aggregated_tensors]
        delta = {name: (result.weights[name] - task.weights[name]).astype(np.float32) for name in aggregated}
        seconds = self._clock() - started
        log.info(
            "%s: round %d trained %d examples in %.2fs, loss %.4f",
            task.device_id,
            task.round,
            result.num_examples,
            seconds,
            result.loss,
        )
        return UpdateMessage(
            device_id=task.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=result.num_examples,
            metrics={  # accuracy is NaN (and left out) for regression bundles
                key: value
                for key, value in {
                    "train_loss": result.loss,
                    "train_accuracy": result.accuracy if bundle.manifest.accuracy_defined else math.nan,
                    "local_eval_loss": evaluation.loss,
                    "local_eval_accuracy": evaluation.accuracy,
                    "train_seconds": seconds,
                    # fp16 bundles: overflowed (skipped) steps and the dynamic loss scale
                    **(
                        {"skipped_steps": float(result.skipped_steps), "loss_scale": result.loss_scale}
                        if result.loss_scale is not None
                        else {}
                    ),
                }.items()
                if math.isfinite(value)
            },
            delta=delta,
        )
