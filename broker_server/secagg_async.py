"""FedBuff with secure aggregation: ``mode = "async"`` and a ``[secagg]`` table (docs/secagg.md).

:class:`SecAggAsyncEngine` is the :class:`~broker_server.async_engine.AsyncEngine` whose buffers
are secure-aggregation sessions (:mod:`broker_server.secagg_buffers`) instead of streams of plain
UPDATEs:

* **Opening a buffer.** Whenever ``asynchronous.concurrency`` leaves room for a whole cohort
  (:func:`~broker_server.secagg_config.buffer_cohort`: ``ceil(over_selection × buffer_size)``
  devices) and that many idle eligible devices are online, the engine takes the next buffer
  number, tasks all of them at once on the *current* version (one TASK payload, fresh nonces,
  the ``fp32`` codec, each TASK's ``secagg`` object) and opens the buffer's session and its round
  record (with the cohort's tasks). Several buffers may be open at once; a device whose task
  timed out may be tasked into another buffer while still in an open one (its own keys per session).
* **Sealing.** A session that completes with ``t`` or more survivors seals its buffer: the
  survivors' example-weighted mean delta (plain tensors rebased to the current model,
  :func:`rebase_cohort`) goes through ``strategy.apply`` and is stored as the next version,
  atomically with its round record. Its staleness ``s`` (versions made since the cohort's
  version) is one number for the whole cohort: a cohort more than ``max_staleness`` behind is
  aborted, as FedBuff refuses a stale update; otherwise the factor ``f(s)`` multiplies the sum
  and its total weight alike, so the mean is the one the plain engine makes of the same updates
  (recorded in the version's metrics).
* **Aborting.** A session below its threshold at any phase abandons its buffer (round record
  abandoned with the reason, reported as an incomplete :class:`RoundResult`): nothing is revealed
  and the model is unchanged. Its tasks leave the task table, so its devices are eligible for
  the next buffer.
* **Plain UPDATEs are refused** (the server must never hold an individual update); ERRORs free
  their member from every phase's wait.
* **Restarts.** Masked sums cannot be resumed without keeping secrets, so a restarted server
  abandons the open buffers' rounds ("server restarted during secure-aggregation buffer r") and
  starts with an empty task table. Nothing of a session reaches the ledger (the FedBuff setting):
  it holds an empty buffer and the task table; a sealed buffer exists only as its stored version.
* **Stalls.** New buffers open only while a version was made within ``task_timeout_s +
  wait_for_clients_s``; once no buffer is open and none was sealed for that long, the run stops
  with an abandoned result (every open session ends by its own deadlines).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from broker_server.async_engine import AsyncEngine
from broker_server.async_ledger import ASYNC_SETTING, AsyncLedger, TaskEntry, issue_tasks
from broker_server.journal import OpenRound
from broker_server.participation import RoundSelector
from broker_server.round_engine import RoundEngine
from broker_server.round_plan import RoundPlan
from broker_server.rounds import RoundState
from broker_server.secagg_buffers import BufferSession, BufferSessions, SealedSession, SessionEnd
from broker_server.secagg_config import buffer_cohort
from broker_server.server_config import RoundResult, ServerConfig
from broker_server.update_binding import IssuedTask
from edge_agent.errors import ConfigError, ContractViolation
from edge_agent.protocol.binding import TaskBinding
from edge_agent.protocol.messages import ErrorMessage, SecAggMessage, UpdateMessage, encode_message
from edge_agent.secagg import encode
from edge_agent.secagg.messages import Message as FFSAMessage

__all__ = ["AsyncEngine", "SecAggAsyncEngine", "async_engine_class", "rebase_cohort", "secagg_handler"]

log = logging.getLogger("fedflock.server")

#: the store setting listing the buffers whose sessions are open
SETTING = "secagg_buffers"
RESTARTED = (
    "server restarted during secure-aggregation buffer {round}: a masked sum cannot be resumed without "
    "keeping secrets (the devices' sessions are gone)"
)


def rebase_cohort(
    delta: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray] | None,
    plain: frozenset[str],
) -> dict[str, np.ndarray]:
    """A cohort's delta on its base version, for the current weights: plain tensors (BatchNorm
    statistics) get ``w[base] − w[current]`` added, so they become the devices' own mean statistics
    (what :func:`~broker_server.async_results.rebase_buffers` does when every update shares one base)."""
    out = dict(delta)
    if base is None:
        return out
    for name in plain:
        fix = base[name].astype(np.float64) - np.asarray(current[name], dtype=np.float64)
        out[name] = (out[name].astype(np.float64) + fix).astype(out[name].dtype)
    return out


class SecAggAsyncEngine(AsyncEngine):
    """FedBuff whose every buffer is one secure-aggregation session (module docstring)."""

    def __init__(self, *args: Any, session_ids: Callable[[], bytes] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self._core.config.secagg_settings()
        if settings is None:
            raise ConfigError("secagg: the secure FedBuff engine needs a [secagg] table")
        self.cohort = buffer_cohort(self.settings.buffer_size, self._core.config.over_selection)
        self.sessions = BufferSessions(
            settings,
            self._core.bundle.manifest.aggregated_tensors,
            send=self._send_ffsa,
            session_ids=session_ids or (lambda: secrets.token_bytes(16)),
        )
        self._last_version_at = 0.0
        #: buffers whose session aborted
        self.aborted = 0

    # -- start -----------------------------------------------------------------------------------

    def begin(self, open_round: OpenRound | None, *, next_round: int) -> None:
        """Abandon the sessions a previous process left open; start with an empty task table."""
        core, journal = self._core, self._journal
        version = core.model_version
        self._buffer = self._new_buffer(version)
        self._history[version] = {name: np.array(core.weights[name]) for name in self._plain}
        stored = journal.load_setting(ASYNC_SETTING)
        if stored is not None and (dropped := len(AsyncLedger.from_json(stored).buffer.contributors)):
            log.warning("secure aggregation is on: %d plain updates of the stored buffer are dropped", dropped)
        left = journal.load_setting(SETTING)
        was_open = set(left.get("rounds", [])) if isinstance(left, Mapping) else set()
        if open_round is not None:
            number = open_round.state.round
            reason = RESTARTED.format(round=number) if number in was_open else "federation resumed in async mode"
            journal.abandoned(number, reason)
            self.made.append(self._round_result(number, completed=False, reason=reason))
        self._tasks, self._round = {}, next_round
        journal.save_setting(SETTING, None)
        self._save(self._buffer.snapshot())
        self._progress = self._last_version_at = self._clock()

    # -- the loop (called by AsyncEngine.run under its lock) -----------------------------------------

    def _top_up(self) -> None:
        """Advance the open sessions, then open buffers while devices and concurrency allow."""
        now = self._clock()
        ended = self.sessions.step(
            now, current_version=self._core.model_version, max_staleness=self.settings.max_staleness
        )
        for end in ended:
            self._ended(end)
        if self.sessions.open:
            self._progress = now  # every session ends by its own deadlines
        stall_s = self.settings.task_timeout_s + self._core.config.wait_for_clients_s
        if self.finished or self._stopped or now - self._last_version_at > stall_s:
            return
        while self._open_buffer():
            pass

    def _open_buffer(self) -> bool:
        core, n = self._core, self.cohort
        busy = {entry.device_id for entry in self._tasks.values() if not entry.expired}
        if self.settings.concurrency - len(busy) < n:
            return False
        candidates = [c for c in self._registry.candidates(core.bundle.digest) if c.device_id not in busy]
        if len(candidates) < n:
            return False
        wall = self._wall_clock()
        quarantined = core.safeguards.excluded(c.device_id for c in candidates)
        choice = self._selector.choose(self._round, candidates, now=wall, exclude=quarantined, cap=n)
        if len(choice.chosen) < n:
            return False
        number, version = self._round, core.model_version
        self._round += 1
        timeout = self.settings.task_timeout_s
        issued = issue_tasks(
            choice.chosen,
            round_=number,
            model_version=version,
            deadline=wall + self._held_s,
            base_digest=self._version_payload()[2],
        )
        tasks = {task_id: entry.device_id for task_id, entry in issued.items()}
        counts = [r.num_examples for d in tasks.values() if (r := self._registry.get(d)) is not None]
        session = self.sessions.start(number, version, tasks, counts=counts, now=self._clock(), task_timeout_s=timeout)
        plan = core.plan(number, wanted=n)
        state = RoundState(round=number, model_version=version, tasks=tasks, specs=session.specs)
        state.bindings = {t: TaskBinding(e.nonce, e.base_digest) for t, e in issued.items()}
        self._journal.round_opened(OpenRound(state=state, plan=plan, created_at=wall, deadline=wall + self._held_s))
        self._journal.save_setting(SETTING, {"rounds": self.sessions.rounds()})
        self._tasks.update(issued)
        self._save(self._buffer.snapshot())
        self._selector.record(number, choice.chosen, now=wall)
        if self._selector.budgeted:
            self._journal.save_setting(RoundSelector.SETTING, self._selector.to_json())
        self._sent += len(issued)
        self._send_session(session, issued, plan)
        return True

    @property
    def _held_s(self) -> float:
        """How long a device keeps its task and session: the masked inputs are due by ``task_timeout_s``,
        the unmasking answers up to ``unmask_timeout_s`` later (an agent forgets a session at its
        TASK's deadline, so that deadline must cover the unmasking phase)."""
        return self.settings.task_timeout_s + self.sessions.settings.unmask_timeout_s

    def _send_session(self, session: BufferSession, issued: dict[str, TaskEntry], plan: RoundPlan) -> None:
        core = self._core
        payload, chunk = self._version_payload()[1], core.config.chunk_bytes
        for task_id, entry in issued.items():
            task = plan.task(
                device_id=entry.device_id,
                round=session.round,
                task_id=task_id,
                model_version=session.base_version,
                bundle_digest=core.bundle.digest,
                deadline_s=self._held_s,
            )
            task = dataclasses.replace(task, nonce=entry.nonce, codecs=("fp32",), secagg=session.task_fields(task_id))
            envelope = encode_message(task, payload=payload)
            topic = core.config.topics.tasks(entry.device_id)
            if len(envelope) <= chunk:
                self._transport.publish(topic, envelope, qos=1)
            else:
                self._link.send(
                    topic, envelope, device_id=entry.device_id, round=session.round, task_id=task_id, chunk_size=chunk
                )

    def _send_ffsa(self, device_id: str, task_id: str, round_: int, session: bytes, message: FFSAMessage) -> None:
        envelope = SecAggMessage(
            device_id=device_id, round=round_, task_id=task_id, session=session, payload=encode(message)
        )
        self._transport.publish(self._core.config.topics.tasks(device_id), encode_message(envelope), qos=1)

    def _stall(self, stall_s: float) -> None:
        reason = f"no version made for {stall_s:.0f}s ({self.aborted} buffers aborted)"
        self._journal.round_skipped(self._round, self._core.model_version, reason)
        self.made.append(self._round_result(self._round, completed=False, reason=reason))
        self._round += 1
        self._stopped = True

    # -- messages --------------------------------------------------------------------------------

    def on_result(self, message: UpdateMessage | ErrorMessage) -> bool:
        """ERRORs as in FedBuff (the member is no longer waited for); plain UPDATEs are refused."""
        if isinstance(message, UpdateMessage):
            raise ContractViolation("secure aggregation is on: plain UPDATEs are refused (send the masked input)")
        with self._lock:
            entry = self._tasks.get(message.task_id)
            counted = super().on_result(message)
            if entry is not None and entry.device_id == message.device_id:
                self.sessions.fail(message.task_id)
            return counted

    def on_secagg(self, message: SecAggMessage) -> None:
        """A device's SECAGG message; ContractViolation for one no open session takes."""
        with self._lock:
            self.sessions.on_message(message)

    # -- ends --------------------------------------------------------------------------------------

    def _ended(self, end: SessionEnd) -> None:
        if isinstance(end, SealedSession):
            self._seal(end)
        else:
            self.aborted += 1
            self._journal.abandoned(end.round, end.reason)
            self.made.append(self._round_result(end.round, completed=False, reason=end.reason, end=end))
            log.warning("buffer %d abandoned: %s", end.round, end.reason)
        for task_id, device_id in end.tasks.items():  # its devices may join a later buffer
            self._tasks.pop(task_id, None)
            self._answered[task_id] = IssuedTask(device_id=device_id, model_version=end.base_version)
        self._journal.save_setting(SETTING, {"rounds": self.sessions.rounds()} if self.sessions.open else None)
        self._save(self._buffer.snapshot())

    def _seal(self, end: SealedSession) -> None:
        """The sealed buffer's version: strategy step, evaluation, stored atomically with its round."""
        core = self._core
        began = self._clock()
        staleness = core.model_version - end.base_version
        factor = self.settings.staleness_fn()(staleness)
        delta = rebase_cohort(end.delta, core.weights, self._history.get(end.base_version), self._plain)
        weights = core.strategy.apply(core.weights, delta, round=end.round, plain=self._plain)
        aggregation_s = self._clock() - began
        test = self._evaluator(weights) if self._evaluator is not None else None
        result = self._round_result(end.round, completed=True, end=end, version=core.model_version + 1)
        result = dataclasses.replace(
            result,
            aggregation_s=aggregation_s,
            test_loss=test.loss if test is not None else None,
            test_accuracy=test.accuracy if test is not None else None,
        )
        metrics: dict[str, object] = asdict(result)
        metrics["secagg"] = {
            "session": end.session.hex(),
            "cohort": end.cohort,
            "threshold": end.threshold,
            "survivors": list(end.survivors),
            "dropped": list(end.dropped),
            "base_version": end.base_version,
            "staleness": staleness,
            "staleness_weight": factor,
            "total_weight": factor * end.total_examples,
        }
        self._journal.completed(
            end.round,
            version=result.model_version,
            parent=core.model_version,
            bundle_digest=core.bundle.digest,
            weights=weights,
            metrics=metrics,
            strategy=core.strategy,
        )
        core.weights, core.model_version = weights, result.model_version
        self._history[result.model_version] = {name: np.array(weights[name]) for name in self._plain}
        for old in [v for v in self._history if v < result.model_version - self.settings.max_staleness]:
            del self._history[old]
        self.made.append(result)
        self._progress = self._last_version_at = self._clock()
        log.info(
            "buffer %d sealed: v%d from %d of %d devices (staleness %d), %d examples",
            end.round,
            result.model_version,
            len(end.survivors),
            end.cohort,
            staleness,
            end.total_examples,
        )
        if self.finished:
            for aborted in self.sessions.abort_all(f"the federation has made its {self.settings.versions} versions"):
                self._ended(aborted)

    def _round_result(
        self, number: int, *, completed: bool, reason: str = "", end: SessionEnd | None = None, version: int = -1
    ) -> RoundResult:
        return RoundResult(
            round=number,
            model_version=version if version >= 0 else self._core.model_version,
            selected=len(end.tasks) if end is not None else 0,
            reported=len(end.survivors) if isinstance(end, SealedSession) else 0,
            failed=end.failed if end is not None else 0,
            num_examples=end.total_examples if isinstance(end, SealedSession) else 0,
            duration_s=self._clock() - end.opened_at if end is not None else 0.0,
            completed=completed,
            reason=reason,
        )


def async_engine_class(config: ServerConfig) -> type[AsyncEngine]:
    """The FedBuff engine ``config`` asks for: secure buffers with a ``[secagg]`` table, else plain."""
    return SecAggAsyncEngine if config.secagg_settings() is not None else AsyncEngine


def secagg_handler(engine: RoundEngine, asynchronous: AsyncEngine | None) -> Callable[[SecAggMessage], None] | None:
    """Where the dispatcher sends SECAGG messages: the secure buffers, the sync round's session, or nowhere."""
    if isinstance(asynchronous, SecAggAsyncEngine):
        return asynchronous.on_secagg
    return engine.secagg.on_message if engine.secagg is not None else None
