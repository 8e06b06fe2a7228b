"""The scale-out coordinator: the server's synchronous round loop, with the counting done by workers.

:class:`ScaleoutCoordinator` does what :class:`~broker_server.server.FederatedServer` does in a
sync round — device registry (it subscribes to STATUS only), selection
(:class:`~broker_server.participation.RoundSelector`), the round's plan, task bindings, TASKs,
the deadline, ``strategy.apply``, the new version through the journal — from the same pieces,
but never sees an UPDATE: the workers (:mod:`broker_server.scaleout.worker`) claim and fold them.
It follows a round through the store: the accepted and failed claims decide the outcome
(:func:`~broker_server.selection.round_outcome`, exactly as a single server's counts would) —
only the claims that will be in a partial (:func:`~broker_server.scaleout.liveness.count_claims`:
flushed ones, and unflushed ones of workers still beating) — and
:func:`~broker_server.scaleout.closing.gather_round` combines the workers' partials at the close.

Liveness: every poll it reads the workers' beat counters
(:class:`~broker_server.scaleout.liveness.BeatWatch`); a session whose counter has not moved
for ``lease_s`` on the coordinator's own clock (no clock skew between hosts involved) is fenced,
and the TASKs of the updates it had claimed but not flushed are sent again — the agents answer
a known task id with their stored result, and another worker counts it. Until then (from 3
missed beats on) those claims do not count, so they never make a round look complete. Like the single server
(:class:`~broker_server.task_resend.TaskResends`), it also sends a TASK again when its device
reconnected since, or when its own link came back, as long as no worker claimed the task.

TASKs always travel whole (a chunked download's acks would go to the workers) and ask devices to
send results of up to ``max_result_bytes`` whole. A coordinator restarted on a store with an open
round resumes it (:mod:`broker_server.scaleout.resume` says from which step): the round, its
claims and the flushed partials are in the store, and the workers kept claiming meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from broker_server.dispatch import Dispatcher
from broker_server.journal import OpenRound, RoundJournal
from broker_server.models import ModelPublisher
from broker_server.participation import RoundSelector
from broker_server.persistence.scaleout import ScaleoutLedger
from broker_server.persistence.sql import SqlServerStore
from broker_server.registry import DeviceRegistry
from broker_server.round_engine import Evaluator
from broker_server.round_plan import RoundPlan
from broker_server.round_results import round_result
from broker_server.rounds import RoundState, bind_tasks
from broker_server.scaleout.closing import gather_round
from broker_server.scaleout.config import ScaleoutSettings, check_scaleout
from broker_server.scaleout.liveness import BeatWatch, count_claims
from broker_server.scaleout.resume import outcome_at_close, resume_step
from broker_server.scaleout.tasks import LiveRound, TaskSender
from broker_server.selection import Abandon, Complete, Wait, round_outcome
from broker_server.server_config import RoundResult, ServerConfig
from broker_server.store import ModelStore
from broker_server.strategies import Strategy, TaskSettings, check_task_settings, plain_tensor_names
from edge_agent.errors import ProtocolError
from edge_agent.protocol.binding import payload_digest
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import Bundle
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport

__all__ = ["ScaleoutCoordinator"]

log = logging.getLogger("fedflock.scaleout")

Tensors = dict[str, np.ndarray]


class ScaleoutCoordinator:
    """Runs the rounds; ``store`` is the PostgreSQL store the workers share (its owner closes it)."""

    def __init__(
        self,
        transport: Transport,
        bundle: Bundle,
        config: ServerConfig,
        *,
        store: SqlServerStore,
        settings: ScaleoutSettings,
        evaluator: Evaluator | None = None,
        out_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        check_store: bool = True,
    ) -> None:
        """``check_store=False`` skips the PostgreSQL-only check (tests of the logic on SQLite)."""
        check_scaleout(config, "postgresql://" if not check_store else getattr(store, "where", None))
        self.config, self.bundle, self.settings = config, bundle, settings
        self.strategy: Strategy = config.make_strategy()
        self.registry = DeviceRegistry()
        self.results: list[RoundResult] = []
        self.weights: Tensors = {}
        self.model_version = 0
        #: worker sessions fenced (their unflushed updates' TASKs are sent again)
        self.fenced: list[str] = []
        self._transport, self._evaluator, self._clock = transport, evaluator, clock
        self._wall_clock = wall_clock
        self._journal = RoundJournal(store, wall_clock=wall_clock)
        self._ledger = ScaleoutLedger(store, clock=wall_clock)
        self._selector = RoundSelector(
            config.selection_policy(), window_s=config.budget_window_s, rng=rng or random.Random(config.seed)
        )
        self._dispatcher = Dispatcher(
            transport,
            config.topics,
            link=TransferLink(transport, clock=clock),
            registry=self.registry,
            publisher=ModelPublisher(config.topics),
            on_result=self._not_here,
            clock=clock,
        )
        self._models = ModelStore(Path(out_dir) / "models") if out_dir is not None else None
        self._plain = plain_tensor_names(bundle.manifest)
        #: the workers' beat counters as the coordinator sees them (who is beating, whose lease ran out)
        self.beats = BeatWatch(beat_window_s=settings.beat_window_s, lease_s=settings.lease_s)
        self._tasks = TaskSender(
            transport, config.topics, bundle_digest=bundle.digest, connects_of=self.registry.connects, clock=clock
        )
        self._next_round = 1
        #: the round a restart left open, resumed first by :meth:`run`
        self._resumable: OpenRound | None = None
        #: the round being collected (for re-sends)
        self._live: LiveRound | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, weights: Tensors | None = None) -> None:
        """Store version 0 (or continue the store's federation), connect, subscribe to STATUS."""
        check_task_settings(TaskSettings(hyperparameters=self._plan(1, 1).hyperparameters), self.bundle.manifest)
        initial = weights if weights is not None else self.bundle.initial_weights()
        resumption = self._journal.begin(self.bundle, initial, self.strategy)
        self.weights = initial
        if resumption is not None:
            self.weights, self.model_version = resumption.weights, resumption.model_version
            self._next_round = resumption.next_round
            self._resumable = resumption.open_round
            self._close_stale(resumption.open_round)
        elif self._models is not None:
            self._models.save(0, self.weights, {"parent": None, "bundle_digest": self.bundle.digest})
        self._transport.start()
        self._transport.subscribe(self.config.topics.all_devices("status"), qos=1)

    def close(self) -> None:
        self._transport.close()

    @property
    def resent(self) -> int:
        """TASKs published again: after a worker was fenced, a reconnect, or a restart."""
        return self._tasks.resent

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        """Finish the round a restart left open (if any), then run rounds up to ``config.rounds``
        (counting the store's earlier ones)."""
        if self._resumable is not None:
            opened, self._resumable = self._resumable, None
            result = self.resume_round(opened)
            if on_round is not None:
                on_round(result)
        while self._next_round <= self.config.rounds:
            result = self.run_round(self._next_round)
            if on_round is not None:
                on_round(result)
        return self.results

    def wait_for_devices(self, count: int, timeout_s: float) -> list[str]:
        deadline = self._clock() + timeout_s
        while len(eligible := self.registry.eligible(self.bundle.digest)) < count and self._clock() < deadline:
            self._dispatcher.pump(min(0.25, max(deadline - self._clock(), 0.0)))
        return eligible

    # -- one round -------------------------------------------------------------------------------

    def run_round(self, number: int) -> RoundResult:
        started, config = self._clock(), self.config
        self._next_round = max(self._next_round, number + 1)
        self.wait_for_devices(config.min_clients, config.wait_for_clients_s)
        now = self._wall_clock()
        selection = self._selector.choose(number, self.registry.candidates(self.bundle.digest), now=now)
        if selection.eligible < config.min_clients:
            reason = f"only {selection.eligible} eligible devices online, need {config.min_clients}"
            self._journal.round_skipped(number, self.model_version, reason)
            return self._finish(self._result(number, None, started, completed=False, reason=reason))
        plan = self._plan(number, selection.wanted)
        state = RoundState(
            round=number,
            model_version=self.model_version,
            tasks={f"r{number}-{uuid.uuid4().hex[:12]}": device_id for device_id in selection.chosen},
            specs=self.bundle.manifest.aggregated_tensors,
            codecs=plan.codec_names,
        )
        payload = self._payload()
        state.bindings = bind_tasks(state.tasks, payload_digest(payload))
        self._journal.round_opened(OpenRound(state=state, plan=plan, created_at=now, deadline=now + plan.timeout_s))
        self._ledger.open_round(number)
        self._selector.record(number, selection.chosen, now=now)
        live = LiveRound(state=state, plan=plan, payload=payload, deadline=self._clock() + plan.timeout_s)
        return self._collect_and_close(live, started, state.tasks)

    def resume_round(self, opened: OpenRound) -> RoundResult:
        """Continue a round a restart left open, from the step the store says (module docstring)."""
        state, plan, number = opened.state, opened.plan, opened.state.round
        now, wall = self._clock(), self._wall_clock()
        started, deadline = now - max(wall - opened.created_at, 0.0), now + max(opened.deadline - wall, 0.0)
        step = resume_step(number, self._ledger.round_status(number), settled=bool(state.accepted or state.failed))
        log.info("resuming round %d: %s, %.0fs left", number, getattr(step, "reason", step), deadline - now)
        if isinstance(step, Abandon):
            self._journal.abandoned(number, step.reason)
            return self._finish(self._result(number, state, started, completed=False, reason=step.reason))
        if step == "finish":
            return self._decide(
                state, outcome_at_close(state, wanted=plan.wanted, min_reports=self.config.min_reports), started, lost=0
            )
        if step == "gather":
            return self._close(state, None, started, plan=plan)
        if step == "open":
            self._ledger.open_round(number)
            outstanding = dict(state.tasks)
        else:
            claimed = self._ledger.claims(number)
            outstanding = {t: d for t, d in state.tasks.items() if t not in claimed}
        live = LiveRound(state=state, plan=plan, payload=self._payload(), deadline=deadline)
        return self._collect_and_close(live, started, outstanding, again=True)

    def _payload(self) -> bytes:
        """The TASK payload: the current model's shared tensors (the round's base)."""
        shared = self.bundle.manifest.shared_model_tensors
        return encode_tensors({t.name: self.weights[t.name] for t in shared})

    def _collect_and_close(
        self, live: LiveRound, started: float, send: Mapping[str, str], *, again: bool = False
    ) -> RoundResult:
        self._live = live
        try:
            self._tasks.send(live, send, again=again)
            outcome = self._collect(live.state, live.plan, live.deadline)
            return self._close(live.state, outcome, started, plan=live.plan)
        finally:
            self._live = None

    def _plan(self, number: int, wanted: int) -> RoundPlan:
        plan = RoundPlan.make(
            self.config, self.strategy.configure_task(number), wanted=wanted, strategy=self.strategy.name
        )
        return dataclasses.replace(plan, max_chunk_bytes=self.settings.max_result_bytes)

    def _collect(self, state: RoundState, plan: RoundPlan, deadline: float) -> Complete | Abandon:
        """Wait for the round's outcome. While it collects, the unflushed claims of a worker that
        stopped beating are outstanding (they come back through the fence and re-sent TASKs);
        once the deadline passed nothing can be re-sent, so they count and the close settles them
        (flushed by a worker that was only slow, or lost and re-checked by :meth:`_decide`)."""
        while True:
            self._watch()  # the beats first: the claims read next are counted against them
            counts = count_claims(self._ledger.tally(state.round), self.beats.beating)
            passed = self._clock() >= deadline
            accepted = counts.accepted + (counts.pending if passed else 0)
            outcome = round_outcome(
                accepted,
                wanted=plan.wanted,
                min_reports=self.config.min_reports,
                outstanding=len(state.tasks) - accepted - counts.failed,
                deadline_passed=passed,
            )
            if not isinstance(outcome, Wait):
                return outcome
            self._dispatcher.pump(min(self.settings.poll_s, max(deadline - self._clock(), 0.0)))
            due = self._tasks.due_again(state, lambda: self._ledger.claims(state.round))
            if due and self._live is not None:
                log.info("round %d: sending %d TASKs again after a reconnect", state.round, len(due))
                self._tasks.send(self._live, due, again=True)

    def _close(
        self, state: RoundState, outcome: Complete | Abandon | None, started: float, *, plan: RoundPlan
    ) -> RoundResult:
        """Gather the round's partials and finish it; ``outcome=None``: a round a restart found
        closing (its outcome follows from the claims)."""
        gathered = gather_round(
            self._ledger,
            state,
            close_timeout_s=self.settings.close_timeout_s,
            clock=self._clock,
            wait=self._dispatcher.pump,
            watch=self._watch,
            poll_s=self.settings.poll_s,
            closing=outcome is None,
        )
        self.fenced.extend(gathered.fenced)
        if outcome is None:
            outcome = outcome_at_close(gathered.state, wanted=plan.wanted, min_reports=self.config.min_reports)
        return self._decide(gathered.state, outcome, started, lost=gathered.lost)

    def _decide(self, closed: RoundState, outcome: Complete | Abandon, started: float, *, lost: int) -> RoundResult:
        """Complete the gathered round through the strategy, or abandon it."""
        number = closed.round
        reason = outcome.reason if isinstance(outcome, Abandon) else ""
        if isinstance(outcome, Complete) and len(closed.accepted) < self.config.min_reports:
            reason = f"{lost} updates lost with workers that died at the close; {len(closed.accepted)} left"
        if reason:
            self._journal.abandoned(number, reason)
            self._ledger.closed(number)
            return self._finish(self._result(number, closed, started, completed=False, reason=reason))
        began = self._clock()
        weights = self.strategy.apply(self.weights, closed.mean.result(), round=number, plain=self._plain)
        aggregation_s = self._clock() - began
        test = self._evaluator(weights) if self._evaluator is not None else None
        result = self._result(number, closed, started, completed=True, version=self.model_version + 1)
        result = dataclasses.replace(
            result,
            aggregation_s=aggregation_s,
            test_loss=test.loss if test else None,
            test_accuracy=test.accuracy if test else None,
        )
        self._journal.completed(
            number,
            version=result.model_version,
            parent=self.model_version,
            bundle_digest=self.bundle.digest,
            weights=weights,
            metrics=asdict(result),
            strategy=self.strategy,
        )
        self._ledger.closed(number)
        self.weights, self.model_version = weights, result.model_version
        if self._models is not None:
            self._models.save(result.model_version, weights, {"parent": result.model_version - 1, "round": number})
        return self._finish(result)

    # -- workers and TASKs -----------------------------------------------------------------------

    def _watch(self) -> dict[int, list[str]]:
        """Fence every live worker whose beats stopped for ``lease_s``; re-send the current round's
        TASKs it had claimed but not flushed. Returns what was released, by round."""
        released = dict[int, list[str]]()
        for session in self.beats.observe(self._ledger.workers(), self._clock()):
            freed = self._ledger.fence(session)
            self.fenced.append(session)
            log.warning("worker %s missed its lease; fenced, releasing %s", session, freed or "nothing")
            for number, tasks in freed.items():
                released.setdefault(number, []).extend(tasks)
        if (live := self._live) is not None and (freed_now := released.get(live.state.round)):
            self._tasks.send(live, {task_id: live.state.tasks[task_id] for task_id in freed_now}, again=True)
        return released

    def _close_stale(self, resumed: OpenRound | None) -> None:
        """Mark closed to the workers every unfinished ledger round that is not resumed (the
        journal closed them: completed, or abandoned at the restart because it trained an older
        version), so no worker keeps claiming for them."""
        keep = None if resumed is None else resumed.state.round
        for number in self._ledger.unfinished_rounds():
            if number != keep:
                log.warning("round %d: closed to the workers (it is not open in the store)", number)
                self._ledger.closed(number)

    @staticmethod
    def _not_here(message: UpdateMessage | ErrorMessage) -> bool:
        raise ProtocolError("results are counted by the scale-out workers, not the coordinator")

    def _finish(self, result: RoundResult) -> RoundResult:
        self.results.append(result)
        log.info(
            "round %d: %s, %d/%d updates (%d examples), %.1fs",
            result.round,
            f"v{result.model_version}" if result.completed else f"abandoned ({result.reason})",
            result.reported,
            result.selected,
            result.num_examples,
            result.duration_s,
        )
        return result

    def _result(
        self,
        number: int,
        state: RoundState | None,
        started: float,
        *,
        completed: bool,
        reason: str = "",
        version: int | None = None,
    ) -> RoundResult:
        return round_result(
            number,
            state,
            model_version=self.model_version if version is None else version,
            duration_s=self._clock() - started,
            completed=completed,
            reason=reason,
        )
