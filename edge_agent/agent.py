"""The device agent: take tasks, train with onnxruntime when allowed, forward results (docs/agent.md)."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent_config import AgentConfig
from edge_agent.agent_io import AgentIO
from edge_agent.blobs import ClaimUploads
from edge_agent.data import Dataset
from edge_agent.device.eligibility import Decision
from edge_agent.device.monitor import Monitor
from edge_agent.device.policy import Policy
from edge_agent.device.state import DeviceState
from edge_agent.errors import FedflockError, NonFiniteLoss, ProtocolError
from edge_agent.gate import Gate, StaticMonitor, throttle, working_set
from edge_agent.model_updates import ModelUpdates
from edge_agent.ota import ModelUpdater
from edge_agent.presence import status_message
from edge_agent.protocol.messages import (
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    SecAggMessage,
    TaskMessage,
    UpdateMessage,
    decode_message,
    encode_message,
)
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.checkpoint import TrainingPaused
from edge_agent.runtime.personal import PersonalStore
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.secagg_session import SecAggSessions
from edge_agent.store import DeviceStore, InboxTask
from edge_agent.task_runner import CheckpointShelf, TaskRunner
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport
from edge_agent.uploads import Uploader

log = logging.getLogger("fedflock.agent")

#: How often expired tasks/results and old history are purged from the store
PURGE_INTERVAL_S = 300.0
#: How often an agent without tasks re-checks (and, if changed, reports) whether it could train
IDLE_CHECK_S = 10.0


class Agent(AgentIO):
    """A device: receives tasks into its inbox, trains when the device can afford it, forwards results.

    ``monitor`` samples the sensors, ``policy`` says what the device may do when (without one it
    is always eligible: tests, demo, benchmarks). ``store``: the inbox/outbox, by default
    ``state_dir/agent.db`` (in memory without a state_dir), opened at :meth:`start`."""

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        trainer: OrtTrainer,
        data: Dataset,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        network: Callable[[], str] | None = None,
        monitor: Monitor | None = None,
        policy: Policy | None = None,
        store: DeviceStore | None = None,
        local_now: Callable[[], datetime] = datetime.now,
        sleep: Callable[[float], None] = time.sleep,
        validation: Dataset | None = None,
        updater: ModelUpdater | None = None,
        open_trainer: Callable[[Bundle], OrtTrainer] = lambda bundle: OrtTrainer.open(bundle, lazy=True),
    ) -> None:
        """``network`` reports the active link type when there is no ``monitor``; ``updater``
        installs models announced over the air (``open_trainer`` then opens the new one)."""
        self.config = config
        self._transport = transport
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._rng = np.random.default_rng(config.seed)
        self._validation = validation
        self.runner = self._runner(trainer, data)
        self._open_trainer = open_trainer
        self.gate = Gate(
            monitor or StaticMonitor(network or (lambda: "unknown"), wall_clock),
            policy,
            history=lambda since: self.store.participations(since),
            local_now=local_now,
        )
        self._store = store
        self._uploader: Uploader | None = None
        self._checkpoints = CheckpointShelf(config.state_dir / "checkpoints" if config.state_dir else None)
        self._work = working_set(trainer.bundle.manifest)
        self.tasks_done = 0
        self._link = TransferLink(transport, clock=clock)
        self._claims = ClaimUploads(config.device_id, self._publish_result, wall_clock=wall_clock, clock=clock)
        #: secure-aggregation sessions, in memory only (edge_agent.secagg_session)
        self.secagg = SecAggSessions(
            config.device_id,
            lambda: self.runner.trainer.bundle.manifest.aggregated_tensors,
            publish=self._publish_secagg,
            send_large=self._send_secagg,
            rng=self._rng,
            wall_clock=wall_clock,
        )
        #: envelopes that arrived while an upload waited for its acknowledgements
        self._deferred: deque[bytes] = deque()
        #: last eligibility published per phase group ("train" covers "continue")
        self._reported: dict[str, tuple[bool, tuple[str, ...]]] = {}
        self._last_idle_check = -math.inf
        self._stop: threading.Event | None = None
        #: TASK max_chunk_bytes by task id (a restarted agent falls back to config.chunk_bytes)
        self._chunk_limits: dict[str, int] = {}
        self._last_purge = -math.inf
        self._models: ModelUpdates | None = None
        self._start_digest, self._connected = trainer.bundle.digest, True
        if updater is not None:
            self._models = ModelUpdates(
                updater,
                publish=lambda topic, envelope: self._transport.publish(topic, envelope, qos=1),
                switch=self._switch_model,
                report=lambda: self._publish_status(online=True),
                may_download=lambda: self.gate.check("download", self.gate.state()).eligible,
            )

    def _install_report(self) -> dict[str, Any] | None:
        return self._models.install_status() if self._models is not None else None

    def _refresh_after_reconnect(self) -> None:
        """A transport's birth STATUS carries the start-up model and no eligibility or install
        report: after a reconnect, publish the current ones again."""
        connected = bool(getattr(self._transport, "is_connected", lambda: True)())
        if connected and not self._connected:
            self._reported.clear()  # the next eligibility check publishes again
            if self._start_digest != self.runner.trainer.bundle.digest or self._install_report() is not None:
                self._publish_status(online=True)
            self._last_idle_check = -math.inf
        self._connected = connected

    def _runner(self, trainer: OrtTrainer, data: Dataset) -> TaskRunner:
        return TaskRunner(
            trainer,
            data,
            rng=self._rng,
            clock=self._clock,
            state_dir=self.config.state_dir,
            codec_preferences=self.config.codec_preferences,
            error_feedback=self.config.error_feedback,
            validation=self._validation,
            local_dp=self.config.local_dp(),
        )

    def _switch_model(self, bundle_dir: Path) -> None:
        """Run the model installed in ``bundle_dir`` from the next task on, and say so in STATUS."""
        trainer = self._open_trainer(Bundle.open(bundle_dir))
        trainer.check_data(self.runner.data.x, self.runner.data.y)
        self.runner = self._runner(trainer, self.runner.data)
        self._work = working_set(trainer.bundle.manifest)
        self._publish_status(online=True)

    @property
    def personal(self) -> PersonalStore:
        return self.runner.personal

    @property
    def store(self) -> DeviceStore:
        """The inbox/outbox (opened on first use when the agent was not given one)."""
        if self._store is None:
            path: Path | str = ":memory:"
            if self.config.state_dir is not None:
                self.config.state_dir.mkdir(parents=True, exist_ok=True)
                path = self.config.state_dir / "agent.db"
            self._store = DeviceStore.open(path, clock=self._wall_clock, config=self.config.store)
        return self._store

    def _upload_queue(self) -> Uploader:
        if self._uploader is None:
            self._uploader = Uploader(
                self.store, self._send_envelope, clock=self._clock, rng=random.Random(self.config.seed)
            )
        return self._uploader

    def start(self) -> None:
        topics, device_id = self.config.topics, self.config.device_id
        _ = self.store  # a broken store fails the start, not the first task
        self._transport.start()
        self._transport.subscribe(topics.tasks(device_id), qos=1)
        if self._models is not None:
            self._transport.subscribe(self._models.topic, qos=1)
        self._publish_status(online=True)

    def close(self) -> None:
        try:
            self._publish_status(online=False)
        except FedflockError as exc:
            log.warning("%s: could not publish offline status: %s", self.config.device_id, exc)
        self._transport.close()
        if self._store is not None:
            self._store.close()

    def _publish_status(self, *, online: bool, decision: Decision | None = None) -> None:
        status = status_message(
            self.config.device_id,
            device_class=self.config.device_class,
            online=online,
            bundle_digest=self.runner.trainer.bundle.digest,
            num_examples=len(self.runner.data),
            decision=decision,
            state=self.gate.state() if decision is not None else None,
            install=self._install_report(),
        )
        self._transport.publish(
            self.config.topics.status(self.config.device_id), encode_message(status), qos=1, retain=True
        )

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Serve tasks until ``stop`` is set (training then pauses at its next step with a
        checkpoint, continued after a restart) or ``max_tasks`` tasks are done."""
        self._stop = stop
        limit = self.config.max_tasks
        while (stop is None or not stop.is_set()) and (limit is None or self.tasks_done < limit):
            self._link.poll()
            if self._deferred:
                self.handle_payload(self._deferred.popleft())
                continue
            inbound = self._transport.receive(timeout=poll_s)
            if inbound is not None:
                self.handle_payload(inbound.payload)
            else:
                self.tick()

    def handle_payload(self, payload: bytes, *, reassembled: bool = False) -> None:
        try:
            message = decode_message(payload)
        except ProtocolError as exc:
            log.warning("%s: dropped undecodable task (%s): %s", self.config.device_id, exc.code, exc)
            return
        if self._models is not None and self._models.accepts(message):
            self._models.handle(message)
            return
        if self._claims.accepts(message):  # an upload grant (with a TASK) or a claim's ack
            self._claims.handle(message)
            return
        mine = message.device_id == self.config.device_id
        if isinstance(message, ChunkMessage | ChunkAck) and mine and not reassembled:
            whole = self._link.handle(message, self.config.topics.results(self.config.device_id))
            if whole is not None:
                self.handle_payload(whole, reassembled=True)
            return
        if isinstance(message, SecAggMessage) and mine:
            self._handle_secagg(message)
            return
        if not isinstance(message, TaskMessage) or not mine:
            log.warning("%s: dropped %s not addressed to this device", self.config.device_id, type(message).__name__)
            return
        self._accept_task(message, payload)
        self.tick()

    def _accept_task(self, task: TaskMessage, envelope: bytes) -> None:
        """Put a task into the inbox; a task already answered gets its stored result again."""
        if self.store.get_result(task.task_id) is not None:
            log.info("%s: task %s delivered again; re-sending its result", task.device_id, task.task_id)
            self.store.requeue_result(task.task_id)
            return
        now = self._wall_clock()
        if not self.store.put_task(task.task_id, task.round, envelope, now, now + task.deadline_s):
            log.info("%s: task %s is already in the inbox", task.device_id, task.task_id)
        if task.secagg is not None:
            try:
                self.secagg.start(task)  # keys go out at once, before training
            except FedflockError as exc:
                error = ErrorMessage(
                    device_id=task.device_id, round=task.round, task_id=task.task_id, code=exc.code, reason=exc.reason
                )
                self.store.put_result(task.task_id, task.round, encode_message(error), now + self.config.result_ttl_s)

    def tick(self) -> None:
        """One scheduling pass: purge what expired, upload what is due, train what is waiting."""
        now = self._wall_clock()
        if now - self._last_purge >= PURGE_INTERVAL_S:
            self.store.purge(now)
            self._last_purge = now
        self.secagg.purge(now)
        state = self.gate.state()
        self._refresh_after_reconnect()
        if self._models is not None:
            self._models.tick()
        self._upload_due(state, now)
        pending = self.store.pending_tasks(now)
        self._checkpoints.prune({task.task_id for task in pending})
        if pending:
            self._train(pending[0], state)
            self._upload_due(self.gate.state(), self._wall_clock())
        elif self._clock() - self._last_idle_check >= IDLE_CHECK_S:
            # keep the server's view current: a device that said "cannot train" is not selected
            self._last_idle_check = self._clock()
            self._report(self.gate.check("train", state, working_set_bytes=self._work.at(2)))

    def _upload_due(self, state: DeviceState, now: float) -> None:
        uploader = self._upload_queue()
        while (item := uploader.next_item(now)) is not None:
            decision = self.gate.check("upload", state)
            if not decision.eligible:
                self._report(decision)
                return
            if not uploader.send(item):
                return

    def _train(self, stored: InboxTask, state: DeviceState) -> None:
        task = decode_message(stored.envelope)
        if not isinstance(task, TaskMessage):  # the inbox only ever holds TASKs
            self.store.task_done(stored.task_id)
            return
        if task.secagg is not None and not self.secagg.holds(task.task_id):  # e.g. the agent restarted
            log.warning("%s: dropped secagg task %s: its session is gone (a dropout)", task.device_id, task.task_id)
            self.store.task_done(stored.task_id)
            return
        batch = self.gate.batch_size(task.batch_size, self._work, state)
        decision = self.gate.check("train", state, working_set_bytes=self._work.at(batch or 2))
        self._report(decision)
        if not decision.eligible or batch is None:
            return
        if task.max_chunk_bytes:
            self._chunk_limits[task.task_id] = task.max_chunk_bytes
        resume, batch = self._checkpoints.resume(task.task_id, batch)
        try:
            message = self.runner.execute(
                task,
                network=state.network.kind,
                should_stop=self._stop_check(stored),
                resume=resume,
                on_step=throttle(self.gate.policy, clock=self._clock, sleep=self._sleep),
                batch_size=batch,
            )
        except TrainingPaused as paused:
            self._paused(stored, paused)
            return
        self._checkpoints.discard(task.task_id)
        now = self._wall_clock()
        if task.secagg is not None and isinstance(message, UpdateMessage):
            self._secagg_trained(message)  # the update leaves masked, never as an UPDATE
        else:
            self.secagg.drop(task.task_id)
            self.store.put_result(task.task_id, task.round, encode_message(message), now + self.config.result_ttl_s)
        self.store.record_participation(task.task_id, now)
        self.tasks_done += 1
        if isinstance(message, ErrorMessage) and message.code == NonFiniteLoss.code and self._models is not None:
            self._models.rollback(message.reason)

    def _secagg_trained(self, message: UpdateMessage) -> None:
        self.store.task_done(message.task_id)
        try:
            self.secagg.trained(message)
        except FedflockError as exc:
            log.warning("%s: secagg task %s: %s (%s)", self.config.device_id, message.task_id, exc.reason, exc.code)
            self.secagg.drop(message.task_id)

    def _stop_check(self, stored: InboxTask) -> Callable[[], bool]:
        """Asked at every step boundary: stop when a condition is lost or the deadline passed; SECAGG
        messages that arrived meanwhile are answered here (edge_agent.agent_io)."""

        def should_stop() -> bool:
            self._pump_secagg()
            if self._wall_clock() >= stored.expires_at or (self._stop is not None and self._stop.is_set()):
                return True
            decision = self.gate.check("continue", self.gate.state(), working_set_bytes=0)
            if not decision.eligible:
                self._report(decision)
            return not decision.eligible

        return should_stop

    def _paused(self, stored: InboxTask, paused: TrainingPaused) -> None:
        if self._wall_clock() >= stored.expires_at:
            log.warning("%s: abandoned task %s: its deadline passed", self.config.device_id, stored.task_id)
            self._checkpoints.discard(stored.task_id)
            self.store.task_done(stored.task_id)
            return
        self._checkpoints.save(stored.task_id, paused.checkpoint)
        log.info("%s: %s", self.config.device_id, paused.reason)

    def execute(self, task: TaskMessage) -> UpdateMessage | ErrorMessage:
        """Train for one task right now, ignoring eligibility and the store (benchmarks, tests)."""
        return self.runner.execute(task, network=self.gate.state().network.kind)
