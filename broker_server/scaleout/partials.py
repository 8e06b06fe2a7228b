"""Partial aggregates: what a worker holds of a round, and how the coordinator combines them (pure).

FedAvg's aggregate is a pair of sums, ``S = sum(w_i * delta_i)`` and ``W = sum(w_i)``, and sums are
associative: a worker that counted the updates of tasks ``T_k`` holds ``(S_k, W_k)``, and the
round's aggregate is ``(sum_k S_k, sum_k W_k)`` when the ``T_k`` are disjoint and their union is
exactly the round's accepted tasks. :func:`combine_partials` checks both — an update in two
partials would be counted twice, an accepted update in none would be lost — and adds the float64
sums in session order (the same order on every run; float64 addition of a handful of partials
changes the mean by a few ulps of float64, far below the float32 the model is stored in).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from broker_server.persistence.records import AggregateCheckpoint
from broker_server.rounds import RoundState
from edge_agent.errors import StorageError

__all__ = ["PartialsMismatch", "checkpoint_of_partial", "combine_partials"]


class PartialsMismatch(StorageError):
    """The workers' partials do not add up to the round's accepted updates."""

    code = "partials_mismatch"


def checkpoint_of_partial(state: RoundState) -> AggregateCheckpoint:
    """A copy of a worker's partial of a round: its own sums, weight, count, tasks and metric sums."""
    return AggregateCheckpoint(
        sums=state.mean.sums() if state.mean.count else {},
        total_weight=state.mean.total_weight,
        count=state.mean.count,
        accepted=frozenset(state.accepted),
        metric_sums=dict(state.metric_sums),
    )


def combine_partials(
    partials: Sequence[tuple[str, AggregateCheckpoint]], accepted: frozenset[str]
) -> AggregateCheckpoint:
    """The round's aggregate from ``(session, partial)`` pairs; ``accepted``: the tasks claimed accepted.

    ``PartialsMismatch`` if a task is in two partials, an accepted task in none, or a partial holds
    a task that is not accepted; nothing is combined then.
    """
    owner: dict[str, str] = {}
    for session, partial in partials:
        for task_id in partial.accepted:
            if task_id in owner:
                raise PartialsMismatch(f"task {task_id!r} is in the partials of {owner[task_id]} and {session}")
            owner[task_id] = session
    missing, extra = sorted(accepted - owner.keys()), sorted(owner.keys() - accepted)
    if missing or extra:
        raise PartialsMismatch(
            f"the partials hold {len(owner)} updates, {len(accepted)} are accepted "
            f"(in no partial: {missing[:3]}, not accepted: {extra[:3]})"
        )
    sums: dict[str, np.ndarray] = {}
    metric_sums: dict[str, float] = {}
    total, count = 0.0, 0
    for _, partial in sorted(partials, key=lambda item: item[0]):
        if partial.count == 0:
            continue
        if sums and set(partial.sums) != set(sums):
            raise PartialsMismatch(f"partials hold different tensors: {sorted(partial.sums)} vs {sorted(sums)}")
        for name, value in partial.sums.items():
            if name in sums:
                if sums[name].shape != np.shape(value):
                    raise PartialsMismatch(f"tensor {name!r}: shape {np.shape(value)} != {sums[name].shape}")
                sums[name] += np.asarray(value, dtype=np.float64)
            else:
                sums[name] = np.array(value, dtype=np.float64)
        for key, metric in partial.metric_sums.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(metric)
        total += partial.total_weight
        count += partial.count
    return AggregateCheckpoint(
        sums=sums, total_weight=total, count=count, accepted=frozenset(owner), metric_sums=metric_sums
    )
