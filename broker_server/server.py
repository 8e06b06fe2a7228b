"""The synchronous FedAvg server: sample devices, send tasks, collect updates, aggregate.

All traffic goes through one :class:`Transport`; the clock and randomness are injected. Bad
messages are logged with a reason and counted in :attr:`FederatedServer.rejections`; they never
stop the server and never disturb updates already accepted. Model bundles are announced and
served to devices that FETCH them by :attr:`FederatedServer.publisher` (:mod:`broker_server.models`)
whenever the server pumps messages (in rounds, while waiting for devices, or in :meth:`serve`).
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from broker_server.aggregate import apply_delta
from broker_server.models import ModelPublisher
from broker_server.registry import DeviceRegistry
from broker_server.rounds import RoundState
from broker_server.store import ModelStore
from edge_agent.codecs import CodecSpec
from edge_agent.errors import ConfigError, ProtocolError
from edge_agent.protocol.messages import (
    MIN_CHUNK_BYTES,
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    FetchMessage,
    ModelMessage,
    StatusMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.protocol.topics import RESULTS, STATUS, Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import EvalResult
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import InboundMessage, Transport

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
Evaluator = Callable[[Tensors], EvalResult]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    rounds: int = 20
    clients_per_round: int = 10
    #: A round starts once this many eligible devices are online ...
    min_clients: int = 2
    #: ... waiting at most this long for them.
    wait_for_clients_s: float = 60.0
    #: A round is abandoned (model unchanged) with fewer updates than this by the deadline.
    min_reports: int = 1
    round_timeout_s: float = 60.0
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    server_lr: float = 1.0
    seed: int = 0
    topics: Topics = Topics()
    #: sent in every TASK: values for the bundle's graph-input hyper-parameters (e.g. fedprox_mu)
    hyperparameters: dict[str, float | tuple[float, ...]] = field(default_factory=dict)
    #: sent in every TASK: tensors to freeze (bundles exported with trainable masks)
    frozen: tuple[str, ...] = ()
    #: update codecs devices may use, in the server's order of preference (edge_agent.codecs);
    #: each device picks from these by its network type. fp32 keeps updates exact.
    codecs: tuple[str, ...] = ("int8", "fp16", "fp32")
    #: largest CHUNK payload for transfers to and from devices (below a 1 MB broker packet limit)
    chunk_bytes: int = 256 * 1024
    #: start() announces the server's bundle as ``model_version`` on this model channel (None: not)
    model_channel: str | None = "current"
    model_version: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError("rounds, clients_per_round, local_epochs and batch_size must be >= 1")
        if not self.min_clients >= 1:
            raise ConfigError("min_clients must be >= 1")
        if not 1 <= self.min_reports <= self.clients_per_round:
            raise ConfigError("min_reports must be between 1 and clients_per_round")
        if self.round_timeout_s <= 0 or self.lr <= 0:
            raise ConfigError("round_timeout_s and lr must be positive")
        if not self.codecs:
            raise ConfigError("codecs must name at least one update codec (e.g. fp32)")
        for name in self.codecs:
            CodecSpec.parse(name)  # raises ConfigError naming the valid codecs
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be >= {MIN_CHUNK_BYTES}")
        if self.model_channel is not None:
            self.topics.model_channel(self.model_channel)  # raises ConfigError for a bad name
        if self.model_version < 1:
            raise ConfigError("model_version must be >= 1")


@dataclass(frozen=True)
class Rejection:
    device_id: str
    code: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    round: int
    model_version: int
    selected: int
    reported: int
    failed: int
    num_examples: int
    duration_s: float
    completed: bool
    reason: str = ""
    train_metrics: dict[str, float] = field(default_factory=dict)
    test_loss: float | None = None
    test_accuracy: float | None = None


class FederatedServer:
    def __init__(
        self,
        transport: Transport,
        bundle: Bundle,
        config: ServerConfig,
        *,
        out_dir: str | Path | None = None,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        publisher: ModelPublisher | None = None,
    ) -> None:
        """``publisher`` announces and serves model bundles (default: one for ``config.topics``)."""
        self.config = config
        self.bundle = bundle
        self.registry = DeviceRegistry()
        self.rejections: deque[Rejection] = deque(maxlen=1000)
        self.results: list[RoundResult] = []
        self.model_version = 0
        self.weights: Tensors = {}
        self._transport = transport
        self._evaluator = evaluator
        self._clock = clock
        self._rng = rng or random.Random(config.seed)
        self._out = Path(out_dir) if out_dir is not None else None
        self._store = ModelStore(self._out / "models") if self._out is not None else None
        self._round: RoundState | None = None
        self._link = TransferLink(transport, clock=clock)
        self.publisher = (
            publisher if publisher is not None else ModelPublisher(config.topics, max_chunk_bytes=config.chunk_bytes)
        )
        #: transfer ids of this round's chunked TASK downloads (forgotten when the round ends)
        self._downloads: list[str] = []
        #: The evaluation of version 0, when an evaluator is given.
        self.baseline: EvalResult | None = None

    def start(self, weights: Tensors | None = None) -> None:
        """Connect, subscribe and store version 0 (the bundle's initial weights by default)."""
        if self._store is not None and self._store.versions():
            raise ConfigError(
                f"{self._store.root} already holds model versions {self._store.versions()[-3:]}...; "
                "use a new output directory (resuming a federation is not supported yet)"
            )
        self.weights = weights if weights is not None else self.bundle.initial_weights()
        topics = self.config.topics
        self._transport.start()
        self._transport.subscribe(topics.all_devices(STATUS), qos=1)
        self._transport.subscribe(topics.all_devices(RESULTS), qos=1)
        channel = self.config.model_channel
        if channel is not None and self.publisher.announced(channel) is None:
            self.publisher.announce(self._transport, channel, self.config.model_version, self.bundle.directory)
        if self._evaluator is not None:
            self.baseline = self._evaluator(self.weights)
        if self._store is not None:
            self._store.save(0, self.weights, {"parent": None, "bundle_digest": self.bundle.digest})

    def close(self) -> None:
        self._transport.close()

    def announce_model(self, version: int, bundle_dir: str | Path, *, channel: str = "current") -> ModelMessage:
        """Publish bundle ``bundle_dir`` as ``version`` on ``channel`` (retained); devices FETCH it."""
        return self.publisher.announce(self._transport, channel, version, bundle_dir)

    def serve(self, duration_s: float) -> None:
        """Handle inbound messages and transfers (e.g. model downloads) for ``duration_s`` seconds."""
        deadline = self._clock() + duration_s
        while (left := deadline - self._clock()) > 0:
            self._pump(min(0.25, left))

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        for number in range(1, self.config.rounds + 1):
            result = self.run_round(number)
            if on_round is not None:
                on_round(result)
        return self.results

    # -- one round -------------------------------------------------------------------------------

    def run_round(self, number: int) -> RoundResult:
        started = self._clock()
        eligible = self.wait_for_devices(self.config.min_clients, self.config.wait_for_clients_s)
        if len(eligible) < self.config.min_clients:
            reason = f"only {len(eligible)} eligible devices online, need {self.config.min_clients}"
            return self._abandon(number, None, started, reason)
        selected = self._rng.sample(eligible, min(self.config.clients_per_round, len(eligible)))
        state = self._collect(number, selected, deadline=started + self.config.round_timeout_s)
        if len(state.accepted) < self.config.min_reports:
            reason = f"{len(state.accepted)} updates by the deadline, need {self.config.min_reports}"
            return self._abandon(number, state, started, reason)
        self.weights = apply_delta(self.weights, state.mean.result(), server_lr=self.config.server_lr)
        self.model_version += 1
        test = self._evaluator(self.weights) if self._evaluator is not None else None
        result = RoundResult(
            round=number,
            model_version=self.model_version,
            selected=len(state.tasks),
            reported=len(state.accepted),
            failed=len(state.failed),
            num_examples=state.num_examples,
            duration_s=self._clock() - started,
            completed=True,
            train_metrics=state.mean_metrics(),
            test_loss=test.loss if test else None,
            test_accuracy=test.accuracy if test else None,
        )
        if self._store is not None:
            meta = {"parent": self.model_version - 1, "round": number, "metrics": asdict(result)}
            self._store.save(self.model_version, self.weights, meta)
        return self._finish(result)

    def _collect(self, number: int, selected: list[str], *, deadline: float) -> RoundState:
        """Send one task per selected device; gather results until all reported or the deadline."""
        state = RoundState(
            round=number,
            model_version=self.model_version,
            specs=self.bundle.manifest.aggregated_tensors,
            codecs=frozenset(CodecSpec.parse(name).name for name in self.config.codecs),
            tasks={f"r{number}-{uuid.uuid4().hex[:12]}": device_id for device_id in selected},
        )
        self._round = state
        try:
            # once per round, not once per device; personal tensors never leave their devices
            shared = self.bundle.manifest.shared_model_tensors
            weights = encode_tensors({t.name: self.weights[t.name] for t in shared})
            for task_id, device_id in state.tasks.items():
                self._send_task(number, task_id, device_id, weights)
            while not state.finished and self._clock() < deadline:
                self._pump(min(0.25, max(deadline - self._clock(), 0.0)))
        finally:
            self._round = None
            for transfer in self._downloads:
                self._link.forget(transfer)
            self._downloads.clear()
        return state

    def _abandon(self, number: int, state: RoundState | None, started: float, reason: str) -> RoundResult:
        return self._finish(
            RoundResult(
                round=number,
                model_version=self.model_version,
                selected=len(state.tasks) if state else 0,
                reported=len(state.accepted) if state else 0,
                failed=len(state.failed) if state else 0,
                num_examples=state.num_examples if state else 0,
                duration_s=self._clock() - started,
                completed=False,
                reason=reason,
            )
        )

    def _finish(self, result: RoundResult) -> RoundResult:
        self.results.append(result)
        if result.completed:
            log.info(
                "round %d: v%d from %d/%d updates (%d examples), test accuracy %s, %.1fs",
                result.round,
                result.model_version,
                result.reported,
                result.selected,
                result.num_examples,
                "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}",
                result.duration_s,
            )
        else:
            log.warning("round %d abandoned: %s", result.round, result.reason)
        if self._out is not None:
            self._out.mkdir(parents=True, exist_ok=True)
            with open(self._out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(result)) + "\n")
        return result

    def _send_task(self, number: int, task_id: str, device_id: str, weights: bytes) -> None:
        task = TaskMessage(
            device_id=device_id,
            round=number,
            task_id=task_id,
            model_version=self.model_version,
            bundle_digest=self.bundle.digest,
            epochs=self.config.local_epochs,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            deadline_s=self.config.round_timeout_s,
            hyperparameters=self.config.hyperparameters,
            frozen=self.config.frozen,
            codecs=self.config.codecs,
            max_chunk_bytes=self.config.chunk_bytes,
        )
        envelope = encode_message(task, payload=weights)
        topic = self.config.topics.tasks(device_id)
        if len(envelope) <= self.config.chunk_bytes:
            self._transport.publish(topic, envelope, qos=1)
            return
        self._downloads.append(
            self._link.send(
                topic, envelope, device_id=device_id, round=number, task_id=task_id, chunk_size=self.config.chunk_bytes
            )
        )

    # -- inbound messages ------------------------------------------------------------------------

    def wait_for_devices(self, count: int, timeout_s: float) -> list[str]:
        """Process inbound messages until ``count`` eligible devices are online or time runs out."""
        deadline = self._clock() + timeout_s
        while len(eligible := self.registry.eligible(self.bundle.digest)) < count and self._clock() < deadline:
            self._pump(min(0.25, max(deadline - self._clock(), 0.0)))
        return eligible

    def _pump(self, timeout: float) -> None:
        self._link.poll()
        inbound = self._transport.receive(timeout=timeout)
        while inbound is not None:
            self.handle(inbound)
            inbound = self._transport.receive(timeout=0)

    def handle(self, inbound: InboundMessage) -> None:
        """Dispatch one inbound message; anything unacceptable is logged and counted, never raised."""
        device_id = "?"
        try:
            device_id, kind = self.config.topics.parse(inbound.topic)
            if kind == STATUS and not inbound.payload:
                return  # a cleared retained status
            message = decode_message(inbound.payload)
            if message.device_id != device_id:
                raise ProtocolError(f"message from {message.device_id!r} published on {device_id!r}'s topic")
            if isinstance(message, ChunkMessage | ChunkAck):
                if kind != RESULTS:
                    raise ProtocolError(f"{type(message).__name__} is not valid on a {kind} topic")
                whole = self._link.handle(message, self.config.topics.tasks(device_id))
                if whole is None:
                    return
                message = decode_message(whole)
                if isinstance(message, ChunkMessage | ChunkAck) or message.device_id != device_id:
                    raise ProtocolError(f"reassembled object from {device_id!r} is not one of its results")
            self._dispatch(kind, message)
        except ProtocolError as exc:
            self.rejections.append(Rejection(device_id, exc.code, exc.reason))
            log.warning("rejected message from %s on %s (%s): %s", device_id, inbound.topic, exc.code, exc.reason)

    def _dispatch(self, kind: str, message: object) -> None:
        if kind == STATUS and isinstance(message, StatusMessage):
            self.registry.observe(message, self._clock())
        elif kind == RESULTS and isinstance(message, FetchMessage):
            self.publisher.handle_fetch(message, self._link)
        elif kind == RESULTS and isinstance(message, UpdateMessage | ErrorMessage):
            state = self._round
            if state is None:
                raise ProtocolError(f"result for round {message.round} arrived while no round is open")
            if isinstance(message, UpdateMessage):
                if not state.accept_update(message):
                    log.info("duplicate update for task %s from %s ignored", message.task_id, message.device_id)
            else:
                state.record_error(message)
                log.warning(
                    "device %s failed task %s (%s): %s",
                    message.device_id,
                    message.task_id,
                    message.code,
                    message.reason,
                )
        else:
            raise ProtocolError(f"{type(message).__name__} is not valid on a {kind} topic")
