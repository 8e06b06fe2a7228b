"""The device agent: announce itself, wait for tasks, train with onnxruntime, upload the delta.

The agent never imports torch; it needs onnxruntime, numpy and a :class:`Transport`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent import __version__
from edge_agent.codecs import (
    CODEC_NAMES,
    DEFAULT_PREFERENCES,
    CodecSpec,
    ErrorFeedback,
    buffer_codec,
    choose_codec,
    encode_update,
    load_residual,
    save_residual,
)
from edge_agent.data import Dataset
from edge_agent.errors import ConfigError, FedflockError, ProtocolError
from edge_agent.protocol.messages import (
    FORMAT_VERSION,
    MIN_CHUNK_BYTES,
    ChunkAck,
    ChunkMessage,
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
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport, Will

log = logging.getLogger("fedflock.agent")

#: How many finished results are kept to answer re-delivered tasks (QoS 1 duplicates).
RESULT_CACHE_SIZE = 8
#: What this agent speaks, announced in STATUS (docs/protocol.md §9)
CAPABILITIES = {"protocol": [FORMAT_VERSION], "codecs": list(CODEC_NAMES)}


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
    #: network type -> update codecs this device prefers on it (strongest compression on cellular);
    #: the codec used is the first of these that the task's server accepts (edge_agent.codecs)
    codec_preferences: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCES))
    #: keep what a lossy codec dropped and add it to the next update (persisted in state_dir)
    error_feedback: bool = True
    #: results larger than this travel as CHUNKs of this size (unless the task asks for smaller)
    chunk_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be >= {MIN_CHUNK_BYTES}")
        for network, names in self.codec_preferences.items():
            for name in names:
                try:
                    CodecSpec.parse(name)
                except FedflockError as exc:
                    raise ConfigError(f"codec preference for {network!r}: {exc.reason}") from exc


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
        capabilities=CAPABILITIES,
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
        network: Callable[[], str] = lambda: "unknown",
    ) -> None:
        """``network`` reports the active link type ("ethernet", "wifi", "cellular", "unknown")."""
        self.config = config
        self._network = network
        self._transport = transport
        self._trainer = trainer
        self._data = data
        self._clock = clock
        self._rng = np.random.default_rng(config.seed)
        self._results: OrderedDict[str, bytes] = OrderedDict()
        self.tasks_done = 0
        self.personal = PersonalStore(trainer.bundle, config.state_dir)
        digest = trainer.bundle.digest[:16]
        self._residual_path = config.state_dir / f"residual-{digest}.ffts" if config.state_dir is not None else None
        self._feedback: ErrorFeedback | None = None
        self._link = TransferLink(transport, clock=clock)
        #: envelopes that arrived while an upload waited for its acknowledgements
        self._deferred: deque[bytes] = deque()

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
            capabilities=CAPABILITIES if online else {},
        )
        self._transport.publish(
            self.config.topics.status(self.config.device_id), encode_message(status), qos=1, retain=True
        )

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Serve tasks until ``stop`` is set or ``max_tasks`` tasks are done."""
        limit = self.config.max_tasks
        while (stop is None or not stop.is_set()) and (limit is None or self.tasks_done < limit):
            self._link.poll()
            if self._deferred:
                self.handle_payload(self._deferred.popleft())
                continue
            inbound = self._transport.receive(timeout=poll_s)
            if inbound is not None:
                self.handle_payload(inbound.payload)

    def handle_payload(self, payload: bytes, *, reassembled: bool = False) -> None:
        try:
            message = decode_message(payload)
        except ProtocolError as exc:
            log.warning("%s: dropped undecodable task (%s): %s", self.config.device_id, exc.code, exc)
            return
        mine = message.device_id == self.config.device_id
        if isinstance(message, ChunkMessage | ChunkAck) and mine and not reassembled:
            whole = self._link.handle(message, self.config.topics.results(self.config.device_id))
            if whole is not None:
                self.handle_payload(whole, reassembled=True)
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
        self._publish_result(message, cached)

    def _publish_result(self, task: TaskMessage, envelope: bytes) -> None:
        """Publish a result; one larger than the chunk size goes as acknowledged CHUNKs."""
        topic = self.config.topics.results(self.config.device_id)
        chunk_bytes = min(self.config.chunk_bytes, task.max_chunk_bytes or self.config.chunk_bytes)
        if len(envelope) <= chunk_bytes:
            self._transport.publish(topic, envelope, qos=1)
            return
        transfer = self._link.send(
            topic, envelope, device_id=task.device_id, round=task.round, task_id=task.task_id, chunk_size=chunk_bytes
        )
        self._link.wait(transfer, self._pump_during_upload, timeout_s=max(task.deadline_s, 1.0))
        state = self._link.state(transfer)
        self._link.forget(transfer)
        if state != "done":
            log.warning("%s: upload of task %s's result did not finish: %s", task.device_id, task.task_id, state)

    def _pump_during_upload(self, timeout: float) -> None:
        """Route acknowledgements (and chunks of a download) while an upload runs; keep the rest."""
        inbound = self._transport.receive(timeout=timeout)
        if inbound is None:
            return
        try:
            message = decode_message(inbound.payload)
        except ProtocolError:
            self._deferred.append(inbound.payload)  # handle_payload logs it in order
            return
        if isinstance(message, ChunkMessage | ChunkAck) and message.device_id == self.config.device_id:
            whole = self._link.handle(message, self.config.topics.results(self.config.device_id))
            if whole is not None:
                self._deferred.append(whole)
        else:
            self._deferred.append(inbound.payload)

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
        spec = choose_codec(task.codecs, self.config.codec_preferences, self._network())
        payload = self._encode(delta, spec)
        seconds = self._clock() - started
        log.info(
            "%s: round %d trained %d examples in %.2fs, loss %.4f; update %d bytes as %s",
            task.device_id,
            task.round,
            result.num_examples,
            seconds,
            result.loss,
            len(payload),
            spec,
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
            codec=str(spec),
            payload=payload,
        )

    def _encode(self, delta: dict[str, np.ndarray], spec: CodecSpec) -> bytes:
        """Encode with error feedback: the residual is reloaded after a restart and saved atomically.

        Tensors are referenced by position in the manifest's aggregated list (no names on the
        wire); running statistics use :func:`buffer_codec` and get no feedback.
        """
        manifest = self._trainer.bundle.manifest
        order = [t.name for t in manifest.aggregated_tensors]
        buffers = [t.name for t in manifest.aggregated_tensors if t.role == "buffer"]
        overrides = dict.fromkeys(buffers, buffer_codec(spec))
        if not self.config.error_feedback:
            return encode_update(delta, spec, rng=self._rng, overrides=overrides, order=order)
        if self._feedback is None:
            residual = load_residual(self._residual_path) if self._residual_path is not None else {}
            shapes = {name: value.shape for name, value in delta.items() if name not in buffers}
            if {n: v.shape for n, v in residual.items()} != shapes:
                residual = {}  # another model's residual (or none): start clean
            self._feedback = ErrorFeedback(residual)
        payload = self._feedback.compress(
            delta, spec, rng=self._rng, overrides=overrides, order=order, without_feedback=buffers
        )
        if self._residual_path is not None:
            self._residual_path.parent.mkdir(parents=True, exist_ok=True)
            save_residual(self._residual_path, self._feedback.residual)
        return payload
