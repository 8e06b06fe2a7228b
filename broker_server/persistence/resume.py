"""The bridge between a live :class:`~broker_server.rounds.RoundState` and what the store holds.

:func:`checkpoint_of` snapshots a round's streaming mean after an update was folded in (pass it to
:meth:`ServerStore.record_acceptance`); :func:`restore_round` rebuilds the ``RoundState`` from a
:class:`RoundSnapshot` after a restart, with the same sums, weight, count, accepted and failed
tasks, so the round continues where it stopped and a re-sent update is recognised as a
duplicate. The streaming mean is read and rebuilt through its public checkpoint accessors
(:meth:`WeightedMean.sums`, :meth:`WeightedMean.restore`).
"""

from __future__ import annotations

from collections.abc import Iterable

from broker_server.aggregate import WeightedMean
from broker_server.persistence.records import AggregateCheckpoint, RoundSnapshot
from broker_server.rounds import RoundState
from edge_agent.errors import StorageError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

__all__ = ["checkpoint_of", "restore_round", "result_key"]


def result_key(message: UpdateMessage | ErrorMessage) -> str:
    """The idempotency key to store with a task's result.

    An UPDATE's is its ``(device_id, task_id, attempt)`` (:attr:`UpdateMessage.idempotency_key`);
    an ERROR has no attempt number, so its key is ``device/task/error``.
    """
    if isinstance(message, UpdateMessage):
        device_id, task_id, attempt = message.idempotency_key
        return f"{device_id}/{task_id}/{attempt}"
    return f"{message.device_id}/{message.task_id}/error"


def checkpoint_of(state: RoundState) -> AggregateCheckpoint:
    """A copy of ``state``'s aggregate (later updates do not change it)."""
    return AggregateCheckpoint(
        sums=state.mean.sums(),
        total_weight=state.mean.total_weight,
        count=state.mean.count,
        accepted=frozenset(state.accepted),
        metric_sums=dict(state.metric_sums),
    )


def restore_round(
    snapshot: RoundSnapshot, *, specs: tuple[TensorSpec, ...], codecs: Iterable[str] = ("fp32",)
) -> RoundState:
    """The ``RoundState`` of an open round as stored.

    ``specs`` and ``codecs`` are what the round was created with (the bundle's aggregated
    tensors, the round config's codecs). ``StorageError`` if the round is closed or its sums do
    not have the specs' names and shapes (the bundle changed under the round).
    """
    record = snapshot.round
    if record.status != "open":
        raise StorageError(f"round {record.round} is {record.status}; only an open round can be resumed")
    checkpoint = snapshot.checkpoint
    if checkpoint.count:
        expected = {spec.name: tuple(spec.shape) for spec in specs}
        stored = {name: tuple(value.shape) for name, value in checkpoint.sums.items()}
        if stored != expected:
            raise StorageError(f"round {record.round}: stored sums {stored} do not match the model's {expected}")
    return RoundState(
        round=record.round,
        model_version=record.model_version,
        tasks=dict(record.tasks),
        specs=specs,
        codecs=frozenset(codecs),
        mean=WeightedMean.restore(checkpoint.sums, total_weight=checkpoint.total_weight, count=checkpoint.count),
        accepted=set(snapshot.accepted),
        failed=snapshot.failed,
        metric_sums=dict(checkpoint.metric_sums),
        bindings=dict(record.bindings),
    )
