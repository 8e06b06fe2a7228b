"""Asynchronous buffered aggregation (FedBuff) in the running server: ``ServerConfig.mode = "async"``.

:class:`AsyncEngine` keeps ``asynchronous.concurrency`` TASKs outstanding on idle eligible devices
(the registry's candidates through the server's :class:`~broker_server.participation.RoundSelector`:
declined, over-budget and quarantined devices are never chosen; one task per device at a time).
Every TASK carries the *current* model version and weights, and its ``round`` is the number of
the buffer open when it was sent. Devices train whenever they can and upload when they finish;
each UPDATE goes to a :class:`~broker_server.fedbuff.FedBuff` whose task table knows every task
issued (device and model version), so an update's staleness is the versions made since its
task's version, it weighs ``num_examples × f(staleness)``, and an update more than
``max_staleness`` behind, a duplicate, or one for a task never issued to its sender is refused
(:class:`UpdateRefused`: the dispatcher counts it in ``FederatedServer.rejections`` by reason).

Every ``buffer_size`` accepted updates seal a buffer: its weighted mean delta goes through
``strategy.apply`` and becomes the next model version, stored through the journal exactly like a
round's (one round record per buffer, ``round`` = the buffer's number, which in a federation that
ran in async mode from the start equals the version it makes), then evaluated and reported as a
:class:`RoundResult` (``selected``: TASKs sent while the buffer was open; ``reported``: the updates
in it). The run stops once ``asynchronous.versions`` versions exist (counted over the whole
federation, like ``rounds``); updates arriving after that are refused (``finished``).

A device that has not answered within ``task_timeout_s`` gets no more waiting: its slot goes to
another device (or to it again); its update is still accepted if it arrives fresh enough. A run
in which nothing was accepted for ``task_timeout_s + wait_for_clients_s`` seals what its buffer
holds (a smaller buffer, so no accepted update is left behind) or, with an empty buffer, stops
with an abandoned result.

Robust rules: ``clip`` clips every update in the buffer; median, trimmed mean and Krum are
refused by :class:`ServerConfig`. Tiered trust refuses quarantined devices, and each sealed
buffer updates the reputations and the store's participation counters
(:mod:`broker_server.async_observers`). Persistence (:mod:`broker_server.async_ledger`): the task
table and the open buffer are stored after every change, before the next message is handled; a
sealed buffer is stored before its version, so a restart refolds accepted-but-unsealed updates,
seals a full buffer whose version was not stored, and never counts an update twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.async_config import AsyncSettings
from broker_server.async_ledger import ASYNC_SETTING, AsyncLedger, TaskEntry, expire_tasks, issue_tasks
from broker_server.async_observers import AsyncObservers
from broker_server.async_results import UpdateRefused, rebase_buffers, remember_version, result_metrics
from broker_server.blob_service import send_grant
from broker_server.fedbuff import Accepted, BufferCheckpoint, BufferResult, FedBuff, IssuedTask, Rejected
from broker_server.journal import OpenRound, RoundJournal
from broker_server.participation import RoundSelector
from broker_server.registry import DeviceRegistry
from broker_server.robust import ClippedWeightedMean
from broker_server.round_engine import Evaluator, RoundEngine
from broker_server.round_plan import RoundPlan
from broker_server.rounds import RoundState
from broker_server.server_config import RoundResult
from broker_server.strategies import plain_tensor_names
from edge_agent.codecs import CodecSpec
from edge_agent.errors import ContractViolation, StorageError
from edge_agent.protocol.binding import payload_digest
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage, encode_message
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.trainer import EvalResult
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport

__all__ = ["AsyncEngine", "UpdateRefused"]

log = logging.getLogger("fedflock.server")


class AsyncEngine:
    """Runs FedBuff on the model the :class:`RoundEngine` ``core`` owns (``weights``, ``model_version``)."""

    def __init__(
        self,
        settings: AsyncSettings,
        core: RoundEngine,
        *,
        transport: Transport,
        link: TransferLink,
        registry: DeviceRegistry,
        journal: RoundJournal,
        selector: RoundSelector,
        pump: Callable[[float], None],
        evaluator: Evaluator | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.settings, self._core = settings, core
        self._transport, self._link, self._selector, self._pump = transport, link, selector, pump
        self._registry, self._journal, self._evaluator = registry, journal, evaluator
        self._clock, self._wall_clock = clock, wall_clock
        self._plain = plain_tensor_names(core.bundle.manifest)
        self._codecs = frozenset(CodecSpec.parse(name).name for name in core.config.codecs)
        self._lock = threading.RLock()
        self._tasks: dict[str, TaskEntry] = {}  # issued, not answered yet (open or timed out)
        #: answered tasks, kept while a replay of them would not be stale (so it is a duplicate)
        self._answered: dict[str, IssuedTask] = {}
        self._buffer = self._new_buffer(0)
        self._round = 0
        self._plan: RoundPlan | None = None
        self._opened_at = 0.0
        self._progress = 0.0
        self._sent = 0
        self._payload: tuple[int, bytes, str] | None = None  # version, its TASK payload, the payload's digest
        self._failed_here = 0
        self._stopped = False
        #: version -> its plain tensors (buffers), for the versions a fresh-enough update can be based on
        self._history: dict[int, dict[str, np.ndarray]] = {}
        #: results of versions made (or of a stop), for the server's loop to report
        self.made: deque[RoundResult] = deque()
        self.failed = 0  # ERROR results from devices (failed tasks)
        specs = core.bundle.manifest.aggregated_tensors  # observers: trust and participation counters
        self._observers = AsyncObservers(core.safeguards, specs, journal=journal, counters=journal.store)

    def _new_buffer(self, version: int) -> FedBuff:
        robust = self._core.safeguards.settings
        factory: Callable[[], WeightedMean] = WeightedMean
        if robust is not None and not self._core.safeguards.buffered:
            clip = robust.clip
            factory = lambda: ClippedWeightedMean(clip=clip)  # noqa: E731
        specs = self._core.bundle.manifest.aggregated_tensors
        config = self.settings.fedbuff_config(self._codecs)
        return FedBuff(config, specs, version=version, task_of=self._task_of, mean_factory=factory)

    def _task_of(self, task_id: str) -> IssuedTask | None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            return entry.issued()
        return self._answered.get(task_id)

    @property
    def pending(self) -> int:
        """Accepted updates waiting in the open buffer."""
        return self._buffer.pending

    @property
    def outstanding(self) -> dict[str, TaskEntry]:
        with self._lock:
            return dict(self._tasks)

    # -- start -----------------------------------------------------------------------------------

    def begin(self, open_round: OpenRound | None, *, next_round: int) -> None:
        """Restore the stored ledger (if any) and open the buffer's round record."""
        version = self._core.model_version
        self._buffer = self._new_buffer(version)
        self._history[version] = {name: np.array(self._core.weights[name]) for name in self._plain}
        data = self._journal.load_setting(ASYNC_SETTING)
        if data is not None:
            ledger = AsyncLedger.from_json(data)
            self._tasks = dict(ledger.tasks)
            base = ledger.buffer.base_version
            if base > version:
                raise StorageError(f"the stored FedBuff buffer is based on v{base}, the latest version is v{version}")
            if base == version:
                self._buffer.restore(ledger.buffer)
                for c in ledger.buffer.contributors:  # a replay of theirs is a duplicate
                    self._answered[c.task_id] = IssuedTask(device_id=c.device_id, model_version=c.model_version)
            elif ledger.buffer.contributors:
                log.info("the stored buffer on v%d is already in a stored version; dropped", base)
            log.info(
                "resuming FedBuff at v%d: %d updates pending, %d tasks out", version, self.pending, len(self._tasks)
            )
        if open_round is not None and not open_round.state.tasks and open_round.state.model_version == version:
            self._open(open_round.state.round, create=False)
        else:
            if open_round is not None:
                self._journal.abandoned(open_round.state.round, "federation resumed in async mode")
            self._open(next_round, create=True)
        self._progress = self._clock()
        self._seal_ready()

    def _open(self, number: int, *, create: bool) -> None:
        core = self._core
        self._round, self._opened_at, self._sent, self._failed_here = number, self._clock(), 0, 0
        self._plan = core.plan(number, wanted=self.settings.buffer_size)
        if create:
            now = self._wall_clock()
            specs = core.bundle.manifest.aggregated_tensors
            state = RoundState(round=number, model_version=core.model_version, tasks={}, specs=specs)
            opened = OpenRound(state=state, plan=self._plan, created_at=now, deadline=now + self._plan.timeout_s)
            self._journal.round_opened(opened)

    # -- the loop --------------------------------------------------------------------------------

    def run(self, on_result: Callable[[RoundResult], None]) -> None:
        """Keep tasks out and make versions until ``settings.versions`` exist (or the run stalls)."""
        stall_s = self.settings.task_timeout_s + self._core.config.wait_for_clients_s
        while True:
            with self._lock:
                self._report(on_result)
                if self.finished or self._stopped:
                    return
                self._expire()
                self._top_up()
                if self._clock() - self._progress > stall_s:
                    self._stall(stall_s)
                    continue
            self._pump(0.25)

    @property
    def finished(self) -> bool:
        return self._core.model_version >= self.settings.versions

    def _report(self, on_result: Callable[[RoundResult], None]) -> None:
        while self.made:
            on_result(self.made.popleft())

    def _stall(self, stall_s: float) -> None:
        if self._buffer.pending:
            log.warning("no update for %.0fs: sealing the buffer with %d updates", stall_s, self._buffer.pending)
            sealed = self._buffer.flush(partial=True)
            if sealed is not None:
                self._make_version(sealed)
            return
        reason = f"no update accepted for {stall_s:.0f}s ({len(self._tasks)} tasks out)"
        self._journal.abandoned(self._round, reason)
        self.made.append(self._result(completed=False, reason=reason))
        self._stopped = True

    def _expire(self) -> None:
        """Free the slots of tasks past their deadline or too stale to count; forget old tasks."""
        oldest = self._core.model_version - self.settings.max_staleness
        changed = expire_tasks(
            self._tasks, now=self._wall_clock(), oldest=oldest, forget_below=oldest - self.settings.max_staleness - 1
        )
        for task_id in [t for t, issued in self._answered.items() if issued.model_version < oldest]:
            del self._answered[task_id]
        if changed:
            self._save(self._buffer.snapshot())

    def _top_up(self) -> None:
        core = self._core
        busy = {entry.device_id for entry in self._tasks.values() if not entry.expired}
        free = self.settings.concurrency - len(busy)
        if free <= 0 or self.finished:
            return
        candidates = [c for c in self._registry.candidates(core.bundle.digest) if c.device_id not in busy]
        if not candidates:
            return
        now = self._wall_clock()
        quarantined = core.safeguards.excluded(c.device_id for c in candidates)
        choice = self._selector.choose(self._round, candidates, now=now, exclude=quarantined, cap=free)
        if not choice.chosen:
            return
        issued = issue_tasks(
            choice.chosen,
            round_=self._round,
            model_version=core.model_version,
            deadline=now + self.settings.task_timeout_s,
            base_digest=self._version_payload()[2],
        )
        self._tasks.update(issued)
        self._save(self._buffer.snapshot())  # before sending: an answer after a restart is still known
        self._selector.record(self._round, choice.chosen, now=now)
        if self._selector.budgeted:
            self._journal.save_setting(RoundSelector.SETTING, self._selector.to_json())
        self._sent += len(issued)
        self._observers.issued([entry.device_id for entry in issued.values()])
        self._send(issued)

    def _version_payload(self) -> tuple[int, bytes, str]:
        """The current version's TASK payload, encoded once per version, and its digest."""
        core = self._core
        if self._payload is None or self._payload[0] != core.model_version:
            shared = core.bundle.manifest.shared_model_tensors
            payload = encode_tensors({t.name: core.weights[t.name] for t in shared})
            self._payload = (core.model_version, payload, payload_digest(payload))
        return self._payload

    def _send(self, issued: dict[str, TaskEntry]) -> None:
        core, plan = self._core, self._plan
        assert plan is not None
        payload, chunk = self._version_payload()[1], core.config.chunk_bytes
        for task_id, entry in issued.items():
            device_id = entry.device_id
            task = plan.task(
                device_id=device_id,
                round=self._round,
                task_id=task_id,
                model_version=core.model_version,
                bundle_digest=core.bundle.digest,
                deadline_s=self.settings.task_timeout_s,
            )
            envelope = encode_message(dataclasses.replace(task, nonce=entry.nonce), payload=payload)
            topic = core.config.topics.tasks(device_id)
            send_grant(core.claims, self._registry, self._transport, topic, task)  # claim check ([blobs])
            if len(envelope) <= chunk:
                self._transport.publish(topic, envelope, qos=1)
            else:
                self._link.send(
                    topic, envelope, device_id=device_id, round=self._round, task_id=task_id, chunk_size=chunk
                )

    def on_result(self, message: UpdateMessage | ErrorMessage) -> bool:
        """An UPDATE or ERROR; True for a counted update; raises ProtocolError for one not accepted."""
        self._core.safeguards.admit(message.device_id)
        with self._lock:
            if isinstance(message, ErrorMessage):
                self._failed(message)
                return False
            if self.finished or self._stopped:
                raise UpdateRefused("finished", f"the federation has made its {self.settings.versions} versions")
            outcome = self._buffer.offer(message, current_version=self._core.model_version)
            if isinstance(outcome, Rejected):
                raise UpdateRefused(outcome.reason, outcome.detail)
            self._accepted(message, outcome)
            return True

    def _accepted(self, update: UpdateMessage, outcome: Accepted) -> None:
        self._answered[update.task_id] = self._tasks.pop(update.task_id).issued()  # FedBuff found it there
        self._progress = self._clock()
        log.debug(
            "update %s from %s: staleness %d, weight %.3g",
            update.task_id,
            update.device_id,
            outcome.staleness,
            outcome.weight,
        )
        if not outcome.ready:
            self._save(self._buffer.snapshot())
        self._observers.accepted(update)  # before the seal that may take it
        self._seal_ready()

    def _failed(self, error: ErrorMessage) -> None:
        entry = self._tasks.get(error.task_id)
        if entry is None or entry.device_id != error.device_id:
            if error.task_id in self._answered:
                return  # an error after its update (or a re-sent one): nothing to do
            raise ContractViolation(f"task {error.task_id!r} was not issued to {error.device_id!r}")
        del self._tasks[error.task_id]
        self.failed += 1
        self._failed_here += 1
        self._save(self._buffer.snapshot())
        self._observers.failed(error.device_id)
        log.warning("device %s failed task %s (%s): %s", error.device_id, error.task_id, error.code, error.reason)

    def _seal_ready(self) -> None:
        while (sealed := self._buffer.flush()) is not None:
            self._make_version(sealed)

    def _make_version(self, sealed: BufferResult) -> None:
        """Store the sealed buffer, then its version; open the next buffer's round."""
        core = self._core
        self._save(BufferCheckpoint.of_result(sealed))  # a crash before the version refolds and re-seals it
        delta = rebase_buffers(sealed, self._core.weights, self._history, self._plain)
        weights = core.strategy.apply(core.weights, delta, round=self._round, plain=self._plain)
        test = self._evaluator(weights) if self._evaluator is not None else None
        result = self._result(completed=True, sealed=sealed, test=test)
        self._journal.completed(
            self._round,
            version=sealed.version,
            parent=sealed.base_version,
            bundle_digest=core.bundle.digest,
            weights=weights,
            metrics=result_metrics(result, sealed),
            strategy=core.strategy,
        )
        core.weights, core.model_version = weights, sealed.version
        self._observers.sealed(self._round, sealed)  # after the version's commit, like a sync round's
        remember_version(self._history, sealed.version, weights, self._plain, self.settings.max_staleness)
        self._save(self._buffer.snapshot())
        self.made.append(result)
        self._progress = self._clock()
        if not self.finished:
            self._open(self._round + 1, create=True)

    def _result(
        self,
        *,
        completed: bool,
        sealed: BufferResult | None = None,
        test: EvalResult | None = None,
        reason: str = "",
    ) -> RoundResult:
        return RoundResult(
            round=self._round,
            model_version=sealed.version if sealed is not None else self._core.model_version,
            selected=self._sent,
            reported=len(sealed.contributors) if sealed is not None else 0,
            failed=self._failed_here,
            num_examples=sealed.num_examples if sealed is not None else 0,
            duration_s=self._clock() - self._opened_at,
            completed=completed,
            reason=reason,
            train_metrics=dict(sealed.train_metrics) if sealed is not None else {},
            test_loss=test.loss if test is not None else None,
            test_accuracy=test.accuracy if test is not None else None,
        )

    def _save(self, buffer: BufferCheckpoint) -> None:
        self._journal.save_setting(ASYNC_SETTING, AsyncLedger(buffer=buffer, tasks=dict(self._tasks)).to_json())
