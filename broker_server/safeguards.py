"""Robust aggregation and tiered trust as the round engine uses them (issue #6).

:class:`Safeguards` holds what outlives a round: the parsed :class:`RobustSettings`, the
:class:`~broker_server.robust.Reputation` and its decisions (:attr:`Safeguards.events`). Per round:

1. **Selection** — :meth:`Safeguards.excluded` names the quarantined devices (never chosen) and
   :attr:`Safeguards.max_tasks` caps the tasks to the rows the update buffer can hold
   (``BufferConfig.max_rows(d)``); :meth:`Safeguards.check` refuses at start-up a buffer too
   small for the rule's :attr:`~RobustSettings.min_updates`.
2. **Collection** — :meth:`Safeguards.prepare` gives the :class:`RoundState` its aggregator: an
   :class:`UpdateBuffer` for median / trimmed mean / Krum, a :class:`ClippedWeightedMean` for
   clip (or for plain FedAvg with trust, unclipped, for its per-update statistics), the plain
   streaming mean otherwise; and each device's trust multiplier. :meth:`Safeguards.admit`
   refuses a result from a quarantined device (:class:`Quarantined`, its reason). A round
   restored from the store continues unless :meth:`Safeguards.unresumable` says why it cannot
   (its tasks no longer fit the update buffer). A restored *buffered* round gets a
   :class:`~broker_server.rounds.Refill`: the store holds its accepted task ids and their
   summed checkpoint, not the rows, so the engine re-sends those TASKs, agents answer them
   with their stored results (rows only, nothing counted twice), and
   :meth:`Safeguards.refilled` closes the refill: rows still missing at the deadline turn into
   failed tasks, and a complete refill must match the stored sums or the round is abandoned.

   Why re-collect rather than store rows: the agents already keep every result for
   ``retention_s`` (7 days) and answer a re-delivered task id from it, so a restart costs one
   upload per accepted update and no new storage; storing rows would add O(model) bytes per
   update to every store backend and its schema, on the hot path of every acceptance.
3. **Aggregation** — :meth:`Safeguards.aggregate` is the round's delta: the rule over the buffer
   or the streaming mean; the engine passes it to ``strategy.apply`` as before.
4. **Trust** — :meth:`Safeguards.observe` measures every accepted update against the aggregate
   (buffered: the distance and cosine of each row to this round's robust aggregate; streaming:
   the clipper's statistics against the *previous* round's aggregate, because this round's does
   not exist until every update is folded in — so a streaming federation's first round, and the
   first after a restart, observe nothing), feeds :meth:`Reputation.update`, and logs every
   decision at WARNING. Asynchronous versions (FedBuff) feed their buffers' observations through
   :meth:`Safeguards.observe_updates` (:mod:`broker_server.async_observers`).

The reputation is JSON (:meth:`state` / :meth:`load_state`; the server keeps it as the store
setting :data:`TRUST_SETTING`, written after each completed round).

**Central DP** (issue #7, :mod:`broker_server.privacy_wiring`) is a third mode, exclusive of the
robust rules and trust (``ServerConfig`` refuses the combination): :meth:`prepare` installs the
round's clipped :class:`~broker_server.privacy.DPMean`, :meth:`aggregate` releases its noisy mean
(charging the accountant), :attr:`releases_every_round` makes the engine release a closed round
however few updates it has, :meth:`stop_reason` ends the federation once the budget is spent
(:meth:`unresumable` refuses a stored round then), and :meth:`postprocess` clamps BatchNorm
variances. The accountant is the store setting ``PRIVACY_SETTING`` (:meth:`privacy_state`).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.privacy import BudgetExhausted
from broker_server.privacy_wiring import PRIVACY_SETTING, CentralPrivacy
from broker_server.robust import (
    ClippedWeightedMean,
    Flattener,
    Observation,
    Reputation,
    RowRule,
    RuleReport,
    TrustConfig,
    TrustDecision,
    UpdateBuffer,
    observe_rows,
)
from broker_server.robust_config import RobustSettings
from broker_server.rounds import Refill, RoundState
from edge_agent.errors import ConfigError, ContractViolation, StorageError
from edge_agent.protocol.manifest import TensorSpec

__all__ = ["PRIVACY_SETTING", "TRUST_SETTING", "BudgetExhausted", "Quarantined", "RobustRound", "Safeguards"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]

#: the store setting the reputation is kept under
TRUST_SETTING = "reputation"
#: "no clipping" for the statistics-only streaming mean (a finite update's norm never exceeds it)
_NO_CLIP = sys.float_info.max


@dataclass(frozen=True)
class RobustRound:
    """What the robust rule did to one completed round's updates (for metrics)."""

    round: int
    rule: str
    updates: int
    #: updates left out of the aggregate (Krum / Multi-Krum: not among its picks)
    excluded: int = 0
    #: updates norm clipping scaled down
    clipped: int = 0


class Quarantined(ContractViolation):
    """A result from a device that tiered trust has quarantined (the reason says why)."""

    code = "quarantined"


class Safeguards:
    """Robust aggregation and tiered trust for one server (see the module docstring)."""

    def __init__(
        self,
        settings: RobustSettings | None,
        trust: TrustConfig | None,
        specs: tuple[TensorSpec, ...],
        *,
        privacy: CentralPrivacy | None = None,
    ) -> None:
        if privacy is not None and (settings is not None or trust is not None):
            raise ConfigError("privacy: central DP cannot be combined with a robust rule or tiered trust")
        self.settings = settings
        #: central DP (None: off)
        self.privacy = privacy
        #: why the federation stopped (the privacy budget), once it has
        self.stopped = ""
        self.reputation = Reputation(trust) if trust is not None else None
        #: every trust decision taken (newest last; the oldest are forgotten after 1000)
        self.events: deque[TrustDecision] = deque(maxlen=1000)
        self._flattener = Flattener.from_specs(specs)
        self._rule: RowRule | None = settings.make_rule() if settings is not None and settings.buffered else None
        #: the last completed round's aggregate delta (the streaming statistics' reference)
        self._reference: Tensors | None = None
        #: what the robust rule did in the last completed round (None without a rule)
        self.last_round: RobustRound | None = None

    # -- selection -------------------------------------------------------------------------------

    @property
    def buffered(self) -> bool:
        return self._rule is not None

    @property
    def max_tasks(self) -> int | None:
        """The most tasks a round may send (the buffer's rows); None when streaming."""
        if self.settings is None or not self.buffered:
            return None
        return self.settings.buffer.max_rows(self._flattener.size)

    @property
    def min_updates(self) -> int:
        return self.settings.min_updates if self.settings is not None else 1

    def describe(self) -> str:
        if self.privacy is not None:
            return "central DP"
        return self.settings.describe() if self.settings is not None else "fedavg"

    @property
    def releases_every_round(self) -> bool:
        """Central DP: a closed round is released even with too few updates (abandoning it would leak the count)."""
        return self.privacy is not None

    def stop_reason(self) -> str:
        """Why no further round may run ("" to go on): the privacy budget is spent. Remembered in :attr:`stopped`."""
        reason = self.privacy.stop_reason() if self.privacy is not None else ""
        if reason and not self.stopped:
            log.warning("stopping the federation: %s", reason)
        self.stopped = self.stopped or reason
        return reason

    def check(self) -> None:
        """``ConfigError`` if the buffer cannot hold the updates the rule needs."""
        fit = self.max_tasks
        if self.settings is not None and fit is not None and fit < self.min_updates:
            buffer = self.settings.buffer
            raise ConfigError(
                f"robust: max_buffer_mb={buffer.max_bytes / 2**20:g} holds {fit} updates of "
                f"{self._flattener.size} {buffer.dtype} elements, and {self.describe()} needs at least "
                f"{self.min_updates} per round (raise max_buffer_mb, or store float16)"
            )

    def excluded(self, device_ids: Iterable[str]) -> dict[str, str]:
        """The quarantined devices among ``device_ids``, with their reasons."""
        reputation = self.reputation
        if reputation is None:
            return {}
        return {d: reputation.status(d).reason for d in device_ids if reputation.is_quarantined(d)}

    def admit(self, device_id: str) -> None:
        """Raise :class:`Quarantined` for a result from a quarantined device."""
        if self.reputation is not None and self.reputation.is_quarantined(device_id):
            raise Quarantined(self.reputation.status(device_id).reason)

    # -- a round ---------------------------------------------------------------------------------

    def prepare(self, state: RoundState) -> None:
        """Give a new or restored round its aggregator and its devices' trust multipliers.

        A restored streaming round keeps its stored sums (already clipped) and clips what
        arrives from now on; a restored buffered round gets a :class:`Refill` of the updates it
        had accepted (their rows are collected again).
        """
        settings = self.settings
        if self.privacy is not None:
            self.privacy.prepare(state)
        elif self.buffered and settings is not None:
            state.buffer = UpdateBuffer(self._flattener, rows=max(1, len(state.tasks)), config=settings.buffer)
            if state.accepted:
                state.refill = Refill.of(state.tasks, state.accepted, state.mean)
        elif settings is not None or self.reputation is not None:
            clip = settings.clip if settings is not None else _NO_CLIP
            reference = self._reference if self.reputation is not None else None
            state.mean = _clipping(state.mean, clip, reference)
        if self.reputation is not None:
            state.multipliers = {d: self.reputation.multiplier(d) for d in state.tasks.values()}

    def unresumable(self, state: RoundState) -> str:
        """Why a round restored from the store cannot continue under these settings ("" if it can)."""
        if self.privacy is not None:
            return self.stop_reason()
        if not self.buffered:
            return ""
        fit = self.max_tasks
        if fit is not None and len(state.tasks) > fit:
            return f"server restarted; the round's {len(state.tasks)} tasks do not fit the update buffer ({fit} rows)"
        return ""

    def refilled(self, state: RoundState) -> str:
        """End a restored round's refill: why the round must be abandoned ("" to go on).

        Tasks whose rows did not come back move from ``accepted`` to ``failed`` (the rule runs
        without them, and their examples leave the round's count; the store still counts them
        accepted, so a late copy stays a duplicate).
        A complete refill is checked against the stored sums (:meth:`Refill.verify`).
        """
        refill, state.refill = state.refill, None
        if refill is None:
            return ""
        if refill.pending:
            for task_id, device_id in sorted(refill.pending.items()):
                state.accepted.discard(task_id)
                state.failed[task_id] = "accepted before the server restarted; not re-sent before the deadline"
                log.warning(
                    "round %d: %s did not re-send task %s; its update is left out", state.round, device_id, task_id
                )
            _count_refilled(state, refill)
            return ""
        reason = refill.verify()
        if reason:
            return f"server restarted; {reason}"
        log.info("round %d: %d updates accepted before the restart collected again", state.round, refill.received.count)
        return ""

    def aggregate(self, state: RoundState) -> tuple[Tensors, RuleReport | None]:
        """The round's delta, and the rule's report when a buffered rule made it.

        Raises :class:`~broker_server.robust.RobustAggregationError` if the rule cannot run, and
        :class:`~broker_server.privacy.BudgetExhausted` (nothing released) past the privacy budget.
        """
        if self.privacy is not None:
            return self.privacy.release(state), None
        if state.buffer is not None and self._rule is not None:
            result = state.buffer.aggregate(self._rule)
            return self._flattener.unflatten(result.delta), result.report
        return state.mean.result(), None

    def report(self, state: RoundState, report: RuleReport | None) -> None:
        """Log what the rule did (Krum's picks, the updates clipping scaled down); keep it as :attr:`last_round`."""
        if self.settings is None:
            return
        if report is not None and state.buffer is not None:
            excluded = report.n - len(report.selected) if report.rule in ("krum", "multi-krum") else 0
            self.last_round = RobustRound(
                state.round, self.describe(), report.n, excluded=excluded, clipped=len(report.clipped)
            )
            if report.rule in ("krum", "multi-krum"):
                picked = report.ids(report.selected, state.buffer.device_ids)
                log.info("round %d: %s averaged %s", state.round, self.describe(), ", ".join(picked))
        if isinstance(state.mean, ClippedWeightedMean):
            clipped = [d for d, s in zip(state.order, state.mean.stats, strict=False) if s.clipped]
            self.last_round = RobustRound(state.round, self.describe(), len(state.order), clipped=len(clipped))
            if clipped:
                log.info(
                    "round %d: %s scaled down %d of %d updates (%s)",
                    state.round,
                    self.describe(),
                    len(clipped),
                    len(state.order),
                    ", ".join(clipped),
                )

    def observe(self, state: RoundState, delta: Mapping[str, np.ndarray]) -> list[TrustDecision]:
        """Feed the completed round's observations to the reputation; returns (and logs) its decisions."""
        reputation = self.reputation
        if reputation is None:
            return []
        observations = self._observations(state, delta)
        if not self.buffered:
            self._reference = {name: np.array(value) for name, value in delta.items()}
        return self.observe_updates(state.round, observations)

    def observe_updates(self, round_number: int, observations: Mapping[str, Observation]) -> list[TrustDecision]:
        """Feed one round's (or asynchronous buffer's, :mod:`broker_server.async_observers`) observations
        to the reputation; returns (and logs) its decisions. A round it already holds is not observed again."""
        reputation = self.reputation
        if reputation is None or not observations:
            return []
        if reputation.last_round is not None and round_number <= reputation.last_round:
            log.warning("round %d: the reputation already holds round %d; not observed", round_number, round_number)
            return []
        decisions = reputation.update(round_number, observations)
        for decision in decisions:
            log.warning(
                "trust: %s %s after round %d (score %.2f): %s",
                decision.device_id,
                decision.action,
                decision.round,
                decision.score,
                decision.reason,
            )
            self.events.append(decision)
        return decisions

    def _observations(self, state: RoundState, delta: Mapping[str, np.ndarray]) -> dict[str, Observation]:
        buffer = state.buffer
        if buffer is not None and len(buffer):
            work = buffer.config.work_bytes
            flat = self._flattener.flatten(delta)
            return observe_rows(buffer.matrix, flat, buffer.device_ids, row_scale=buffer.row_scale, work_bytes=work)
        if isinstance(state.mean, ClippedWeightedMean):
            return {
                device_id: Observation.from_stats(stats)
                for device_id, stats in zip(state.order, state.mean.stats, strict=False)
                if stats.distance is not None
            }
        return {}

    def postprocess(self, weights: Tensors) -> Tensors:
        """The next model after ``strategy.apply``: BatchNorm variances clamped under central DP."""
        return self.privacy.postprocess(weights) if self.privacy is not None else weights

    # -- persistence -----------------------------------------------------------------------------

    def privacy_state(self) -> dict[str, Any] | None:
        """The accountant to store after a round was charged (None without central DP)."""
        return self.privacy.state() if self.privacy is not None else None

    def load_privacy(self, data: Mapping[str, Any] | None) -> None:
        """Continue the privacy budget a previous run spent (a stored one is never reset)."""
        if self.privacy is not None:
            if data is None:
                log.warning("central DP: the stored federation has no accountant (it ran without DP); ε counts from 0")
            self.privacy.load_state(data)
        elif data is not None:
            log.warning("the store holds a privacy accountant, but central DP is off in this run")

    def state(self) -> dict[str, Any] | None:
        return self.reputation.to_state() if self.reputation is not None else None

    def load_state(self, data: Mapping[str, Any] | None) -> None:
        """Restore the reputation stored by a previous run (nothing to do without trust or data)."""
        if self.reputation is None or data is None:
            return
        try:
            self.reputation = Reputation.from_state(data, self.reputation.config)
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"the stored reputation ({TRUST_SETTING!r}) is unusable: {exc}") from exc
        if self.reputation.quarantined:
            log.warning("trust: restored with %s quarantined", ", ".join(self.reputation.quarantined))


def _count_refilled(state: RoundState, refill: Refill) -> None:
    """Take the left-out updates' examples out of a refilled round's count (its stored total less
    the stored refill set's weight, plus the re-collected rows'). Their metrics are unknown (the store
    keeps sums only), so the metric sums are scaled with the count: the round's mean metrics stay
    those of the updates stored before the restart."""
    before = state.examples
    state.examples = max(0, before - round(refill.expected.total_weight) + round(refill.received.total_weight))
    if before > 0:
        scale = state.examples / before
        state.metric_sums = {name: value * scale for name, value in state.metric_sums.items()}


def _clipping(mean: WeightedMean, clip: float, reference: Tensors | None) -> ClippedWeightedMean:
    """A :class:`ClippedWeightedMean` holding ``mean``'s sums, weight and count (they stay as they are)."""
    clipped = ClippedWeightedMean(clip=clip, reference=reference)
    if mean.count:  # the stored sums were clipped when they were folded in: keep them as they are
        clipped.load(mean.sums(), total_weight=mean.total_weight, count=mean.count)
    return clipped
