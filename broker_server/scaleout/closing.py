"""A scale-out round's close: stop the claims, collect the workers' last flushes, combine, check.

:func:`gather_round` is the coordinator's side of a close (docs/scaleout.md):

1. :meth:`ScaleoutLedger.close` — from now on no worker can claim a result of the round;
2. wait until every accepted claim is flushed (each worker flushes when its heartbeat sees the
   round closing); a worker whose beats stop is fenced by ``watch`` (its unflushed claims are
   deleted: those updates are lost *for this round*, which no longer collects), and after
   ``close_timeout_s`` every session still holding unflushed claims is fenced too;
3. read the claims and the partials and :func:`combine_partials` them: the union of the
   partials' task ids must be exactly the accepted claims, no task in two partials;
4. :meth:`ScaleoutLedger.settle` records the result in the store's round tables, as a single
   server would have (accepted and failed tasks with their result keys, participation counters,
   the round's checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from broker_server.aggregate import WeightedMean
from broker_server.persistence.records import AggregateCheckpoint
from broker_server.persistence.scaleout import ScaleoutLedger
from broker_server.rounds import RoundState
from broker_server.scaleout.partials import combine_partials

__all__ = ["Gathered", "gather_round"]

log = logging.getLogger("fedflock.scaleout")


@dataclass(frozen=True, kw_only=True, eq=False)
class Gathered:
    """A closed round's combined aggregate and bookkeeping."""

    state: RoundState
    checkpoint: AggregateCheckpoint
    #: sessions fenced during the close, and the updates that cost this round
    fenced: tuple[str, ...]
    lost: int


def gather_round(
    ledger: ScaleoutLedger,
    state: RoundState,
    *,
    close_timeout_s: float,
    clock: Callable[[], float],
    wait: Callable[[float], None],
    watch: Callable[[], dict[int, list[str]]],
    poll_s: float,
    closing: bool = False,
) -> Gathered:
    """Close ``state.round`` to the workers and combine their partials (module docstring).

    ``wait(seconds)`` passes time usefully (the coordinator pumps its messages); ``watch()``
    fences workers whose lease ran out and returns what it released, by round. ``closing``: the
    round is already closing (a restarted coordinator finishing a close it began).
    """
    number = state.round
    if not closing:
        ledger.close(number)
    deadline = clock() + close_timeout_s
    lost = 0
    fenced: list[str] = []
    while ledger.counts(number)[2]:
        lost += len(watch().get(number, []))
        if clock() >= deadline:
            holders = sorted({c.session for c in ledger.claims(number).values() if not c.flushed})
            for session in holders:
                log.warning(
                    "round %d: worker %s did not flush within %.0fs; fencing it", number, session, close_timeout_s
                )
                lost += len(ledger.fence(session).get(number, []))
                fenced.append(session)
            break
        wait(poll_s)
    claims = ledger.claims(number)
    accepted = frozenset(t for t, c in claims.items() if c.outcome == "accepted")
    partials = [(p.session, p.checkpoint) for p in ledger.partials(number)]
    combined = combine_partials(partials, accepted)
    ledger.settle(number, combined, claims)
    closed = RoundState(
        round=number,
        model_version=state.model_version,
        tasks=dict(state.tasks),
        specs=state.specs,
        codecs=state.codecs,
        mean=WeightedMean.restore(combined.sums, total_weight=combined.total_weight, count=combined.count),
        accepted=set(accepted),
        failed={t: c.reason for t, c in claims.items() if c.outcome == "failed"},
        metric_sums=dict(combined.metric_sums),
        bindings=dict(state.bindings),
    )
    if lost:
        log.warning("round %d: %d claimed updates were never flushed (their workers died at the close)", number, lost)
    return Gathered(state=closed, checkpoint=combined, fenced=tuple(fenced), lost=lost)
