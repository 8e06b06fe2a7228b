"""A scale-out worker: counts device results from its share of the MQTT traffic into partial sums.

:class:`ScaleoutWorker` subscribes to ``$share/{group}/{prefix}/devices/+/results``: Mosquitto
gives every message of that filter to one member of the group (the topic is the original one, so
the dispatcher parses it as usual). Inbound messages go through the server's own
:class:`~broker_server.dispatch.Dispatcher` (topic parsing, decoding, the ``cross_device`` check,
rejections counted with their codes); each UPDATE or ERROR then:

1. is checked against its round as stored by the coordinator (loaded once per round from the
   store: tasks, bindings, codecs) — issued to this device, nonce and base digest echoed; a copy of
   a task this worker already counted is a duplicate without touching the database;
2. is claimed in the store (:meth:`ScaleoutLedger.claim`): only if this worker's insert wins is
   it folded — :meth:`RoundState.accept_update`, i.e. codec, model version, example count, shapes
   and finiteness, the same checks as a single server — inside the claim's transaction, so an
   update that fails them leaves no claim. A result another worker claimed is a duplicate; one
   for a round that closed is late (dropped, counted in :attr:`late`).

Every ``flush_interval_s``, and when it sees a round closing (its heartbeat, every
``heartbeat_s``, returns the closing rounds), it flushes the round's cumulative partial (sums,
weight, count, task ids, metric sums) in one transaction; after the closing flush it forgets the
round. A storage error stops the worker (:meth:`run` raises): its flushed partials are durable,
and the coordinator, seeing its beats stop, fences it and re-sends the TASKs of its unflushed
updates, which agents answer with their stored results (docs/scaleout.md, "Guarantees").

Chunked uploads cannot work here (MQTT would share one upload's chunks among the workers): the
coordinator's TASKs ask for results of up to ``max_result_bytes`` in one message, and a CHUNK
that arrives anyway is refused (``contract_violation``) with that reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from broker_server.aggregate import WeightedMean
from broker_server.dispatch import Dispatcher
from broker_server.events import ServerEvents
from broker_server.models import ModelPublisher
from broker_server.persistence.base import ServerStore
from broker_server.persistence.errors import RecordNotFound, StorageError
from broker_server.persistence.resume import result_key
from broker_server.persistence.scaleout import ScaleoutLedger
from broker_server.registry import DeviceRegistry
from broker_server.round_plan import RoundPlan
from broker_server.rounds import RoundState
from broker_server.scaleout.config import ScaleoutSettings
from broker_server.scaleout.partials import checkpoint_of_partial
from broker_server.server_config import Rejection
from edge_agent.errors import ContractViolation
from edge_agent.protocol.binding import CrossDevice, CrossRound
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, ErrorMessage, UpdateMessage
from edge_agent.protocol.topics import RESULTS, Topics
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport

__all__ = ["ScaleoutWorker", "shared_results_filter"]

log = logging.getLogger("fedflock.scaleout")


def shared_results_filter(group: str, topics: Topics) -> str:
    """The workers' shared subscription: every device's results, each message to one worker."""
    return f"$share/{group}/{topics.all_devices(RESULTS)}"


class _NoChunks(TransferLink):
    """Refuses chunked uploads (a worker sees only some of an upload's chunks)."""

    def __init__(self, transport: Transport, *, clock: Callable[[], float], limit: int) -> None:
        super().__init__(transport, clock=clock)
        self._limit = limit

    def handle(self, message: ChunkMessage | ChunkAck, reply_topic: str) -> bytes | None:
        raise ContractViolation(
            f"chunked result refused: scale-out workers share the MQTT traffic, so no worker sees all of an "
            f"upload's chunks; the TASK asked for results of up to {self._limit} bytes in one message"
        )


class ScaleoutWorker:
    """One worker process (or thread): no I/O until :meth:`start`."""

    def __init__(
        self,
        transport: Transport,
        specs: tuple[TensorSpec, ...],
        *,
        store: ServerStore,
        ledger: ScaleoutLedger,
        settings: ScaleoutSettings,
        topics: Topics,
        clock: Callable[[], float] = time.monotonic,
        events: ServerEvents | None = None,
    ) -> None:
        self.settings = settings
        #: updates this worker counted, duplicates it ignored, results for rounds already closed
        self.accepted = 0
        self.duplicates = 0
        self.late = 0
        self.flushes = 0
        #: duplicates only the store recognised (another worker had counted the result)
        self.claim_conflicts = 0
        self.session: str | None = None
        self._transport, self._specs, self._topics = transport, specs, topics
        self._store, self._ledger, self._clock = store, ledger, clock
        self._rounds: dict[int, RoundState] = {}
        self._flushed: dict[int, int] = {}  # round -> count at its last flush
        self._done: set[int] = set()
        self._next_beat = self._next_flush = 0.0
        self._dispatcher = Dispatcher(
            transport,
            topics,
            link=_NoChunks(transport, clock=clock, limit=settings.max_result_bytes),
            registry=DeviceRegistry(),
            publisher=ModelPublisher(topics),
            on_result=self.on_result,
            clock=clock,
            events=events,
        )

    @property
    def rejections(self) -> deque[Rejection]:
        return self._dispatcher.rejections

    def start(self) -> None:
        """Register a new session in the store, connect, join the shared subscription."""
        self.session = self._ledger.register_worker(self.settings.name)
        self._transport.start()
        self._transport.subscribe(shared_results_filter(self.settings.group, self._topics), qos=1)
        now = self._clock()
        self._next_beat, self._next_flush = now, now + self.settings.flush_interval_s
        log.info("worker %s joined $share/%s", self.session, self.settings.group)

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; then flush and leave (raises on a storage error or a fence)."""
        while not stop.is_set():
            self.step(self.settings.heartbeat_s / 2)
        self.stop()

    def step(self, timeout: float) -> None:
        """Beat and flush when due, then handle the messages queued (waiting up to ``timeout``)."""
        session = self._session()
        now = self._clock()
        if now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_s
            for number in sorted(self._ledger.heartbeat(session) & self._rounds.keys()):
                self._flush(number, final=True)
        if now >= self._next_flush:
            self._next_flush = now + self.settings.flush_interval_s
            for number in sorted(self._rounds):
                self._flush(number, final=False)
        self._dispatcher.pump(timeout)

    def stop(self) -> None:
        """Flush every open partial, mark the session stopped, disconnect."""
        if self.session is not None:
            for number in sorted(self._rounds):
                self._flush(number, final=False)
            self._ledger.stop_worker(self.session)
        self._transport.close()

    # -- results -------------------------------------------------------------------------------

    def on_result(self, message: UpdateMessage | ErrorMessage) -> bool:
        """The dispatcher's result handler: True when this worker counted the update."""
        state = self._round(message.round)
        if state is None:
            self.late += 1
            return False
        owner = state.tasks.get(message.task_id)
        if owner is None:
            raise CrossRound(f"task {message.task_id!r} is not a task of round {state.round}")
        if owner != message.device_id:
            raise CrossDevice(f"task {message.task_id!r} was issued to {owner!r}, not {message.device_id!r}")
        if isinstance(message, UpdateMessage):
            state.check_binding(message)
        if message.task_id in state.accepted or message.task_id in state.failed:
            self.duplicates += 1
            return False
        outcome: Literal["accepted", "failed"] = "accepted" if isinstance(message, UpdateMessage) else "failed"
        weight = float(message.num_examples) if isinstance(message, UpdateMessage) else 0.0
        reason = "" if isinstance(message, UpdateMessage) else f"{message.code}: {message.reason}"
        session = self._session()
        with self._ledger.claim(
            state.round,
            message.task_id,
            session,
            outcome=outcome,
            key=result_key(message),
            weight=weight,
            reason=reason,
        ) as claimed:
            if claimed == "duplicate":
                self.duplicates += 1
                self.claim_conflicts += 1
                return False
            if claimed == "closed":
                self.late += 1
                return False
            counted = (
                state.accept_update(message) if isinstance(message, UpdateMessage) else state.record_error(message)
            )
            if not counted:  # the store had no claim for a task memory had: they diverged
                raise StorageError(f"round {state.round}: task {message.task_id!r} claimed but already counted here")
        if isinstance(message, UpdateMessage):
            self.accepted += 1
        return isinstance(message, UpdateMessage)

    def _round(self, number: int) -> RoundState | None:
        """This worker's partial of round ``number`` (loaded on first sight); None once it closed."""
        state = self._rounds.get(number)
        if state is not None or number in self._done:
            return state
        status = self._ledger.round_status(number)
        if status is None:
            raise CrossRound(f"round {number} is not a round the coordinator opened")
        if status != "collecting":
            self._done.add(number)
            return None
        try:
            snapshot = self._store.load_round(number)
        except RecordNotFound as exc:
            raise CrossRound(f"round {number} is not stored") from exc
        record = snapshot.round
        plan = RoundPlan.from_json(record.config, round=number)
        state = RoundState(
            round=number,
            model_version=record.model_version,
            tasks=dict(record.tasks),
            specs=self._specs,
            codecs=plan.codec_names,
            mean=WeightedMean(workers=self.settings.fold_threads),
            bindings=dict(record.bindings),
        )
        self._rounds[number] = state
        return state

    def _flush(self, number: int, *, final: bool) -> None:
        state = self._rounds[number]
        if len(state.accepted) != self._flushed.get(number, 0):
            self._ledger.flush(number, self._session(), checkpoint_of_partial(state))
            self._flushed[number] = len(state.accepted)
            self.flushes += 1
        if final:
            del self._rounds[number]
            self._flushed.pop(number, None)
            self._done.add(number)
            log.info("worker %s: round %d flushed at its close (%d updates)", self.session, number, len(state.accepted))

    def _session(self) -> str:
        if self.session is None:
            raise StorageError("the worker is not started")
        return self.session
