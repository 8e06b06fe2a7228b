"""The server's durable record of its federation: a :class:`ServerStore`, or nothing.

:class:`RoundJournal` is what the round engine tells about every step that must survive a
restart; without a store each call does nothing, so the engine never asks whether one is
configured. With one:

* the first start stores version 0; every round is created with its tasks and its
  :class:`~broker_server.round_plan.RoundPlan`;
* every accepted UPDATE is committed with the round's new aggregate checkpoint
  (:meth:`ServerStore.record_acceptance`) before the server handles the next message, so an
  update is counted after a crash exactly when its acceptance was committed;
* a completed round stores its model version and the strategy's state in one transaction.

:meth:`RoundJournal.begin` reads it all back on start: the latest model version, the strategy
state, the next round number, and the open round to resume (the newest open round built on the
latest version; any other open round can no longer complete and is abandoned).

Storage failures are never swallowed: a :class:`~edge_agent.errors.StorageError` stops the
server, whose in-memory state may then be ahead of the store (the store is the truth on restart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_server.persistence import ModelVersionRow, RoundRow, ServerStore, StrategyStateRow
from broker_server.persistence.resume import checkpoint_of, restore_round, result_key
from broker_server.round_plan import RoundPlan
from broker_server.rounds import RoundState
from broker_server.strategies import Strategy, StrategyState
from edge_agent.errors import ConfigError, StorageError
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage
from edge_agent.runtime.bundle import Bundle

__all__ = ["OpenRound", "Resumption", "RoundJournal"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class OpenRound:
    """A round as stored: its live state, its plan and its wall-clock times."""

    state: RoundState
    plan: RoundPlan
    created_at: float
    deadline: float


@dataclass(frozen=True, kw_only=True)
class Resumption:
    """Where a restarted server continues."""

    model_version: int
    weights: Tensors
    #: the first round number not yet stored
    next_round: int
    #: the round to collect further (its number is ``next_round - 1``), if one can still complete
    open_round: OpenRound | None


class RoundJournal:
    def __init__(self, store: ServerStore | None, *, wall_clock: Callable[[], float]) -> None:
        self.store = store
        self._wall_clock = wall_clock

    def holds_versions(self) -> bool:
        """True if the store already holds a federation (start() resumes it)."""
        return self.store is not None and bool(self.store.model_versions())

    # -- start -----------------------------------------------------------------------------------

    def begin(self, bundle: Bundle, weights: Tensors, strategy: Strategy) -> Resumption | None:
        """Store version 0 (``weights``) in an empty store; in a used one, say where to resume."""
        store = self.store
        if store is None:
            return None
        versions = store.model_versions()
        if not versions:
            store.put_model_version(
                ModelVersionRow(
                    version=0, parent=None, bundle_digest=bundle.digest, created_at=self._wall_clock(), weights=weights
                )
            )
            return None
        return self._resume(store, bundle, versions[-1], strategy)

    def _resume(self, store: ServerStore, bundle: Bundle, latest: int, strategy: Strategy) -> Resumption:
        row = store.get_model_version(latest)
        if row is None or row.weights is None:
            raise StorageError(f"model version {latest} has no stored weights; cannot resume from it")
        if row.bundle_digest != bundle.digest:
            raise ConfigError(
                f"the server store holds a federation of bundle {row.bundle_digest[:12]}, not {bundle.digest[:12]}; "
                "give the same bundle or a new store"
            )
        saved = store.get_strategy_state(strategy.name)
        if saved is not None:
            strategy.load_state(StrategyState(tensors=dict(saved.tensors), meta=dict(saved.state)))
        elif latest > 0:
            log.warning("no stored state for strategy %r: it starts afresh at model v%d", strategy.name, latest)
        resumed: OpenRound | None = None
        for number in reversed(store.open_rounds()):
            snapshot = store.load_round(number)
            if resumed is None and snapshot.round.model_version == latest:
                plan = RoundPlan.from_json(snapshot.round.config, round=number)
                state = restore_round(snapshot, specs=bundle.manifest.aggregated_tensors, codecs=plan.codec_names)
                record = snapshot.round
                resumed = OpenRound(state=state, plan=plan, created_at=record.created_at, deadline=record.deadline)
            else:
                reason = f"server restarted at model v{latest}; round {number} trained v{snapshot.round.model_version}"
                store.abandon_round(number, reason=reason)
                log.warning("round %d abandoned: %s", number, reason)
        log.info(
            "resuming at model v%d%s",
            latest,
            f", round {resumed.state.round} open with {len(resumed.state.accepted)} updates" if resumed else "",
        )
        return Resumption(
            model_version=latest,
            weights={name: np.array(value) for name, value in row.weights.items()},
            next_round=(store.last_round() or 0) + 1,
            open_round=resumed,
        )

    # -- rounds ----------------------------------------------------------------------------------

    def round_opened(self, opened: OpenRound) -> None:
        if self.store is None:
            return
        state = opened.state
        self.store.create_round(
            RoundRow(
                round=state.round,
                model_version=state.model_version,
                tasks=dict(state.tasks),
                bindings=dict(state.bindings),
                deadline=opened.deadline,
                created_at=opened.created_at,
                config=opened.plan.to_json(),
            )
        )

    def round_skipped(self, number: int, model_version: int, reason: str) -> None:
        """A round that sent no task (too few devices): stored, so its number is not reused."""
        if self.store is None:
            return
        now = self._wall_clock()
        row = RoundRow(round=number, model_version=model_version, tasks={}, deadline=now, created_at=now)
        self.store.create_round(row)
        self.store.abandon_round(number, reason=reason)

    def accepted(self, state: RoundState, update: UpdateMessage) -> None:
        """Commit ``update`` (already folded into ``state``) and the round's new aggregate."""
        if self.store is None:
            return
        key = result_key(update)
        if not self.store.record_acceptance(state.round, update.task_id, key=key, checkpoint=checkpoint_of(state)):
            # the store had a result for a task memory had none for: they diverged, stop
            raise StorageError(f"round {state.round}: the store already holds a result for task {update.task_id!r}")

    def failed(self, state: RoundState, error: ErrorMessage) -> None:
        if self.store is None:
            return
        reason = state.failed[error.task_id]
        self.store.record_failure(state.round, error.task_id, key=result_key(error), reason=reason)

    def completed(
        self,
        number: int,
        *,
        version: int,
        parent: int,
        bundle_digest: str,
        weights: Tensors,
        metrics: Mapping[str, Any],
        strategy: Strategy,
    ) -> None:
        """Store model ``version`` with the strategy's state and close round ``number``, atomically."""
        if self.store is None:
            return
        state = strategy.state()
        self.store.complete_round(
            number,
            version=ModelVersionRow(
                version=version,
                parent=parent,
                bundle_digest=bundle_digest,
                created_at=self._wall_clock(),
                round=number,
                metrics=dict(metrics),
                weights=weights,
            ),
            strategy=StrategyStateRow(name=strategy.name, tensors=state.tensors, state=state.meta, round=number),
        )

    def abandoned(self, number: int, reason: str) -> None:
        if self.store is not None:
            self.store.abandon_round(number, reason=reason)

    # -- small state -----------------------------------------------------------------------------

    def load_setting(self, key: str) -> Any:
        return None if self.store is None else self.store.get_setting(key)

    def save_setting(self, key: str, value: Any) -> None:
        if self.store is not None:
            self.store.put_setting(key, value)
