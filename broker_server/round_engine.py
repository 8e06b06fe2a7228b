"""The synchronous round loop: choose devices, send TASKs, collect results, close the round.

One round (:meth:`RoundEngine.run_round`):

1. :class:`~broker_server.participation.RoundSelector` chooses devices from the registry's
   candidates (over-selection, device classes, participation budget); a device that declined
   or is quarantined (tiered trust) is never chosen, and a robust rule's update buffer caps the
   count. Too few (for ``min_clients``, or for the rule's ``min_updates``): the round is
   skipped (stored as abandoned, model unchanged).
2. The strategy configures the round's TASKs (:class:`~broker_server.round_plan.RoundPlan`),
   the round is stored, and every chosen device gets a TASK with the current shared weights.
3. Results are collected until :func:`~broker_server.selection.round_outcome` decides: the
   round completes as soon as it has the updates it wants even if over-selected devices are
   still training, or at the deadline with at least ``min_reports`` (and the robust rule's
   ``min_updates``); otherwise it is abandoned. Every accepted update is committed to the
   journal before the next message is handled.
4. A completed round's delta — the streaming (clipped) mean, or the robust rule over the
   round's update buffer (:mod:`broker_server.safeguards`) — goes through ``strategy.apply``
   (buffers averaged plainly) to make the next model version, stored with the strategy's state.
   With tiered trust the round's updates are then observed against its aggregate and the
   reputation is stored.

Results for the round that closed last are *late*: with ``late_updates = "drop"``
route_late_update drops them (counted in :attr:`RoundEngine.late_updates`); with ``"async"``
they are kept, staleness-weighted, and join the next completed round's aggregate
(:mod:`broker_server.late_updates`, counted in ``RoundEngine.late.accepted``).
:meth:`RoundEngine.resume` continues a round restored from the store until its stored deadline,
re-sending TASKs to its outstanding devices (agents answer a known task id with their stored
result: nothing is trained or counted twice); a buffered robust rule's buffer is refilled so
(:class:`broker_server.rounds.Refill`).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np

from broker_server.blob_claims import ServerClaims
from broker_server.blob_service import send_grant
from broker_server.cluster_rounds import ClusterRounds
from broker_server.journal import OpenRound, RoundJournal
from broker_server.late_updates import LateUpdates, combine
from broker_server.participation import RoundSelector
from broker_server.registry import DeviceRegistry
from broker_server.robust import RobustAggregationError
from broker_server.round_plan import RoundPlan
from broker_server.round_results import round_result
from broker_server.rounds import RoundState, bind_tasks
from broker_server.safeguards import PRIVACY_SETTING, TRUST_SETTING, BudgetExhausted, Safeguards
from broker_server.secagg_dispatch import SecAggEngine
from broker_server.secagg_round import SecAggOutcome, SecAggRounds
from broker_server.selection import Complete, Wait, round_outcome
from broker_server.server_config import RoundResult, ServerConfig
from broker_server.strategies import Strategy, plain_tensor_names
from broker_server.task_resend import TaskResends
from edge_agent.codecs import CodecSpec
from edge_agent.protocol.binding import TaskBinding, payload_digest
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import EvalResult
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport

__all__ = ["LiveRound", "RoundEngine"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
Evaluator = Callable[[Tensors], EvalResult]


@dataclass(frozen=True, kw_only=True)
class LiveRound:
    """A round being collected: as stored, plus its times on the server's (monotonic) clock."""

    opened: OpenRound
    started: float
    deadline: float

    @property
    def state(self) -> RoundState:
        return self.opened.state


class RoundEngine(SecAggEngine):
    """Owns the global model (``weights``, ``model_version``) and runs rounds on it."""

    claims: ServerClaims | None = None  # upload grants with TASKs (ServerBlobs.attach; None: off)

    def __init__(
        self,
        config: ServerConfig,
        bundle: Bundle,
        *,
        transport: Transport,
        link: TransferLink,
        registry: DeviceRegistry,
        strategy: Strategy,
        journal: RoundJournal,
        selector: RoundSelector,
        safeguards: Safeguards,
        pump: Callable[[float], None],
        evaluator: Evaluator | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        clusters: ClusterRounds | None = None,
        secagg: SecAggRounds | None = None,
    ) -> None:
        self.config, self.bundle, self.strategy = config, bundle, strategy
        self.weights: Tensors = {}
        self.model_version = 0
        #: the round being collected, and the last one closed (its stragglers are late)
        self.current: LiveRound | None = None
        self.closed: RoundState | None = None
        #: updates dropped because their round had closed (e.g. over-selected stragglers)
        self.late_updates = 0
        self._transport, self._link, self._registry = transport, link, registry
        self._journal, self._selector, self._pump = journal, selector, pump
        self.safeguards, self.clusters, self.secagg = safeguards, clusters, secagg
        self._evaluator, self._clock, self._wall_clock = evaluator, clock, wall_clock
        self._plain = plain_tensor_names(bundle.manifest)
        #: transfer ids of this round's chunked TASK downloads (forgotten when the round ends)
        self._downloads: list[str] = []
        self._resends = TaskResends(registry.connects)
        #: stragglers' updates kept for the next round (``late_updates = "async"``), else None
        self.late: LateUpdates | None = None
        if config.late_updates == "async":
            codecs = frozenset(CodecSpec.parse(name).name for name in config.codecs)
            self.late = LateUpdates(
                config.fedbuff_settings(),
                bundle.manifest.aggregated_tensors,
                codecs,
                journal=journal,
                closed=lambda: self.closed,
            )

    def plan(self, number: int, *, wanted: int) -> RoundPlan:
        return RoundPlan.make(
            self.config, self.strategy.configure_task(number), wanted=wanted, strategy=self.strategy.name
        )

    # -- one round -------------------------------------------------------------------------------

    def run_round(self, number: int, *, started: float) -> RoundResult:
        """Select, send, collect and close round ``number`` (``started``: when it began waiting)."""
        config, guard = self.config, self.safeguards
        if stop := guard.stop_reason():  # central DP: the budget is spent, no TASK goes out
            return self._result(number, None, started, completed=False, reason=stop)
        now = self._wall_clock()
        candidates = self._registry.candidates(self.bundle.digest)
        quarantined = guard.excluded(c.device_id for c in candidates)
        selection = self._selector.choose(number, candidates, now=now, exclude=quarantined, cap=guard.max_tasks)
        for device_id, why in sorted(quarantined.items()):
            log.info("round %d: not selecting %s (%s)", number, device_id, why)
        reason = ""
        if selection.eligible < config.min_clients:
            budget = Counter(selection.excluded.values())["over_budget"]
            notes = [f"{budget} more over their participation budget"] if budget else []
            notes += [f"{len(quarantined)} quarantined"] if quarantined else []
            more = f" ({', '.join(notes)})" if notes else ""
            reason = f"only {selection.eligible} eligible devices online{more}, need {config.min_clients}"
        elif len(selection.chosen) < guard.min_updates:
            reason = (
                f"only {len(selection.chosen)} devices selectable, {guard.describe()} needs "
                f"{guard.min_updates} updates per round"
            )
        elif self.secagg is not None:
            reason = self.secagg.too_few(len(selection.chosen))
        if reason:
            self._journal.round_skipped(number, self.model_version, reason)
            return self._result(number, None, started, completed=False, reason=reason)
        if selection.capped:
            log.info("round %d: %d fewer tasks to fit the update buffer", number, selection.capped)
        plan = self.plan(number, wanted=selection.wanted)
        state = RoundState(
            round=number,
            model_version=self.model_version,
            tasks={f"r{number}-{uuid.uuid4().hex[:12]}": device_id for device_id in selection.chosen},
            specs=self.bundle.manifest.aggregated_tensors,
            codecs=plan.codec_names,
        )
        shared = encode_tensors({t.name: self.weights[t.name] for t in self.bundle.manifest.shared_model_tensors})
        state.bindings = bind_tasks(state.tasks, payload_digest(shared))  # stored with the round: replays refused
        self._prepare(state)
        if self.secagg is not None:
            self.secagg.open(state)
        opened = OpenRound(state=state, plan=plan, created_at=now, deadline=now + plan.timeout_s)
        self._journal.round_opened(opened)
        self._selector.record(number, selection.chosen, now=now)
        if self._selector.budgeted:
            self._journal.save_setting(RoundSelector.SETTING, self._selector.to_json())
        live = LiveRound(opened=opened, started=started, deadline=self._clock() + plan.timeout_s)
        self._send_tasks(live, state.tasks)
        return self._collect_and_close(live) if self.secagg is None else self._secagg_close(live, self.secagg)

    def resume(self, opened: OpenRound) -> RoundResult:
        """Collect a round restored from the store until its stored (wall-clock) deadline.

        Under a buffered robust rule the updates accepted before the restart are collected again
        first (their TASKs re-sent; agents answer with their stored results; see
        :class:`~broker_server.rounds.Refill`), until all are back or the deadline passes.
        """
        now, wall = self._clock(), self._wall_clock()
        live = LiveRound(
            opened=opened,
            started=now - max(wall - opened.created_at, 0.0),
            deadline=now + max(opened.deadline - wall, 0.0),
        )
        state, guard = opened.state, self.safeguards
        reason = self._secagg_resume(self._journal, state) or guard.unresumable(state)
        if not reason:
            self._prepare(state)
            outstanding = {t: d for t, d in state.tasks.items() if t not in state.accepted and t not in state.failed}
            refill = dict(state.refill.pending) if state.refill is not None else {}
            log.info(
                "resuming round %d: %d updates stored, re-sending %d tasks (%d to collect stored updates), %.0fs left",
                state.round,
                len(state.accepted),
                len(outstanding) + len(refill),
                len(refill),
                live.deadline - now,
            )
            self._send_tasks(live, {**outstanding, **refill})
            self.current = live  # results route to this round while its stored updates come back
            try:
                while state.refill is not None and state.refill.pending and self._clock() < live.deadline:
                    self._pump(min(0.25, max(live.deadline - self._clock(), 0.0)))
            finally:
                self.current = None
            reason = guard.refilled(state)
        if reason:
            state.buffer = None
            self._journal.abandoned(state.round, reason)
            self.closed = state
            return self._result(state.round, state, live.started, completed=False, reason=reason)
        return self._collect_and_close(live)

    def _prepare(self, state: RoundState) -> None:
        self.safeguards.prepare(state)
        if self.clusters is not None:  # update rows, per-cluster task bindings (broker_server.cluster_rounds)
            self.clusters.prepare(state)

    def _send_tasks(self, live: LiveRound, tasks: Mapping[str, str]) -> None:
        deadline_s = live.deadline - self._clock()
        if not tasks or deadline_s <= 0:
            return
        # once per round, not once per device; personal tensors never leave their devices
        shared = self.bundle.manifest.shared_model_tensors
        clusters = self.clusters  # clustered FL: each device gets its cluster's weights, encoded once per cluster
        weights = encode_tensors({t.name: self.weights[t.name] for t in shared}) if clusters is None else b""
        chunk = self.config.chunk_bytes
        for task_id, device_id in tasks.items():
            task = live.opened.plan.task(
                device_id=device_id,
                round=live.state.round,
                task_id=task_id,
                model_version=live.state.model_version,
                bundle_digest=self.bundle.digest,
                deadline_s=deadline_s,
            )
            task = replace(task, nonce=live.state.bindings.get(task_id, TaskBinding()).nonce)
            task = self.secagg.decorate(task) if self.secagg is not None else task
            envelope = encode_message(task, payload=weights if clusters is None else clusters.payload(device_id))
            topic = self.config.topics.tasks(device_id)
            self._resends.sent(device_id)
            send_grant(self.claims, self._registry, self._transport, topic, task)  # claim checks (docs/blobs.md)
            if len(envelope) <= chunk:
                self._transport.publish(topic, envelope, qos=1)
            else:
                self._downloads.append(
                    self._link.send(
                        topic, envelope, device_id=device_id, round=task.round, task_id=task_id, chunk_size=chunk
                    )
                )

    def _collect_and_close(self, live: LiveRound) -> RoundResult:
        self.current = live
        state = live.state
        try:
            while True:
                outstanding = len(state.tasks) - len(state.accepted) - len(state.failed)
                outcome = round_outcome(
                    len(state.accepted),
                    wanted=live.opened.plan.wanted,
                    min_reports=max(self.config.min_reports, self.safeguards.min_updates),
                    outstanding=outstanding,
                    deadline_passed=self._clock() >= live.deadline,
                )
                if not isinstance(outcome, Wait):
                    break
                self._pump(min(0.25, max(live.deadline - self._clock(), 0.0)))
                self._resend_lost_tasks(live)
        finally:
            self.current, self.closed = None, state
            for transfer in self._downloads:
                self._link.forget(transfer)
            self._downloads.clear()
        if not isinstance(outcome, Complete) and not self.safeguards.releases_every_round:
            state.buffer = None  # a closed round keeps its bookkeeping, not its updates
            self._journal.abandoned(state.round, outcome.reason)
            return self._result(state.round, state, live.started, completed=False, reason=outcome.reason)
        if isinstance(outcome, Complete) and outcome.early and outstanding:
            fate = "kept for the next round" if self.late is not None else "dropped"
            log.info("round %d: %d devices still training; their updates will be %s", state.round, outstanding, fate)
        try:
            return self._complete(live)
        finally:
            state.buffer = None

    def _resend_lost_tasks(self, live: LiveRound) -> None:
        """TASKs published while their device, or the server, was reconnecting are lost: send
        them again (a secure-aggregation session treats a reconnect as a dropout instead)."""
        state = live.state
        if self.secagg is not None:
            return
        outstanding = {t: d for t, d in state.tasks.items() if t not in state.accepted and t not in state.failed}
        due = self._resends.due(outstanding, link_up=bool(getattr(self._transport, "is_connected", lambda: True)()))
        if due:
            log.info("round %d: sending %d TASKs again after a reconnect", state.round, len(due))
            self._send_tasks(live, due)

    def _complete(self, live: LiveRound, secagg: SecAggOutcome | None = None) -> RoundResult:
        state, number, guard = live.state, live.state.round, self.safeguards
        if self.clusters is not None:  # one model per cluster (broker_server.cluster_rounds)
            made = partial(self._result, number, state, live.started, completed=True)
            result = self.clusters.complete(state, make_result=made)
            self.weights, self.model_version = self.clusters.root.weights, result.model_version
            return result
        began = self._clock()  # aggregation: from the round's updates to the next model
        try:
            delta, report = (secagg.delta, None) if secagg is not None else guard.aggregate(state)
        except (RobustAggregationError, BudgetExhausted) as exc:
            reason = f"{guard.describe()}: {exc.reason}"
            self._journal.abandoned(number, reason)
            return self._result(number, state, live.started, completed=False, reason=reason)
        if (charged := guard.privacy_state()) is not None:  # the charge is stored before the model
            self._journal.save_setting(PRIVACY_SETTING, charged)
        guard.report(state, report)
        if self.late is not None:  # the base of this round's stragglers' BatchNorm statistics
            self.late.remember(self.model_version, self.weights)
        late = self.late.take() if self.late is not None else None
        if late is not None:
            delta = combine(delta, state.mean.total_weight, late)
            log.info("round %d: %d late updates joined the aggregate", number, len(late.contributors))
        weights = guard.postprocess(self.strategy.apply(self.weights, delta, round=number, plain=self._plain))
        aggregation_s = self._clock() - began
        test = self._evaluator(weights) if self._evaluator is not None else None
        result = self._result(number, state, live.started, completed=True, test=test, version=self.model_version + 1)
        result = self._secagg_counts(replace(result, aggregation_s=aggregation_s), secagg)
        self._journal.completed(
            number,
            version=result.model_version,
            parent=self.model_version,
            bundle_digest=self.bundle.digest,
            weights=weights,
            metrics=asdict(result),
            strategy=self.strategy,
        )
        self.weights, self.model_version = weights, result.model_version
        if late is not None and self.late is not None:
            self.late.committed(result.model_version)
        guard.observe(state, delta)
        if guard.reputation is not None:
            # after the round's commit: a crash in between loses one round's observations, never
            # observes a round twice
            self._journal.save_setting(TRUST_SETTING, guard.state())
        return result

    def _result(
        self,
        number: int,
        state: RoundState | None,
        started: float,
        *,
        completed: bool,
        reason: str = "",
        test: EvalResult | None = None,
        version: int | None = None,
    ) -> RoundResult:
        return round_result(
            number,
            state,
            model_version=self.model_version if version is None else version,
            duration_s=self._clock() - started,
            completed=completed,
            reason=reason,
            test_loss=test.loss if test else None,
            test_accuracy=test.accuracy if test else None,
        )
