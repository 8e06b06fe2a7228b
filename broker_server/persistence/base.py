"""The :class:`ServerStore` protocol: the one interface every server-store backend implements.

Synchronous on purpose: the server's round loop is single-threaded and each call is one short
transaction. Every method is atomic (one transaction, all or nothing) and raises only
:class:`~edge_agent.errors.StorageError` subclasses (:mod:`broker_server.persistence.errors`).
Implementations are safe to call from several threads; two store objects (or processes) may
share one database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from broker_server.persistence.records import (
    AggregateCheckpoint,
    DeviceRow,
    ModelVersionRow,
    RoundRow,
    RoundSnapshot,
    StrategyStateRow,
)

__all__ = ["ServerStore"]


class ServerStore(Protocol):
    """Devices, rounds with their partial aggregates, model versions, strategy and rollout state."""

    def close(self) -> None:
        """Close the connection (idempotent)."""

    def schema_version(self) -> int:
        """The schema version of the open database."""
        ...

    # -- devices ---------------------------------------------------------------------------

    def upsert_device(self, device: DeviceRow) -> None:
        """Insert or replace a device's registry fields; its participation counters are kept."""

    def get_device(self, device_id: str) -> DeviceRow | None: ...

    def devices(self) -> list[DeviceRow]:
        """All devices, sorted by id."""
        ...

    def count_participation(self, counter: str, device_ids: Sequence[str]) -> None:
        """Add one to ``counter`` (``"selected"``, ``"accepted"`` or ``"failed"``) of every device in
        ``device_ids`` (listed twice: counted twice; unknown: a bare record), in one transaction.

        For tasks outside rounds (asynchronous mode), which have no round rows that count them.
        ``ValueError`` for another counter name.
        """

    # -- rounds ----------------------------------------------------------------------------

    def create_round(self, round_: RoundRow) -> None:
        """Open a round with its tasks; counts a selection for each device.

        ``StoreConflict`` if the round number exists or ``round_.status`` is not ``"open"``;
        ``RecordNotFound`` if its model version is not stored.
        """

    def record_acceptance(self, round_: int, task_id: str, *, key: str, checkpoint: AggregateCheckpoint) -> bool:
        """Mark ``task_id`` accepted and store ``checkpoint`` (the aggregate including it) atomically.

        False, changing nothing, if the task already has a result (the same ``key`` again, or
        another attempt). ``StoreConflict`` if the round is closed or ``checkpoint.accepted`` is
        not the stored accepted set plus ``task_id`` (it was not built on the stored checkpoint,
        so storing it could count an update twice or lose one). ``RecordNotFound`` for an unknown
        round or task.
        """
        ...

    def record_failure(self, round_: int, task_id: str, *, key: str, reason: str) -> bool:
        """Mark ``task_id`` failed with ``reason``; False if it already had a result."""
        ...

    def complete_round(
        self, round_: int, *, version: ModelVersionRow, strategy: StrategyStateRow | None = None
    ) -> None:
        """Store ``version`` (the round's new global model) and close the round, atomically.

        ``strategy``: the server strategy's state after producing ``version`` (e.g. FedAdam's
        moments), stored in the same transaction, so a crash never leaves a strategy that has
        stepped for a round that is still open (resuming would step it twice). The checkpoint's
        sums are dropped (their weight, count and metrics are kept). ``StoreConflict`` if the
        round is closed or the version exists; nothing is written then.
        """

    def abandon_round(self, round_: int, *, reason: str) -> None:
        """Close the round without a new model version; its sums are dropped."""

    def load_round(self, round_: int) -> RoundSnapshot:
        """The round, its tasks and its checkpoint (``RecordNotFound`` if unknown)."""
        ...

    def open_rounds(self) -> list[int]:
        """Numbers of the rounds not yet completed or abandoned, ascending."""
        ...

    def last_round(self) -> int | None:
        """The highest round number stored, if any."""
        ...

    # -- model versions --------------------------------------------------------------------

    def put_model_version(self, version: ModelVersionRow) -> None:
        """Store a model version (``StoreConflict`` if it exists, ``RecordNotFound`` for its parent)."""

    def get_model_version(self, version: int, *, weights: bool = True) -> ModelVersionRow | None:
        """A stored version; with ``weights=False`` its tensors are not read (``weights`` is None)."""
        ...

    def model_versions(self) -> list[int]:
        """Every stored version number, ascending."""
        ...

    def lineage(self, version: int) -> list[ModelVersionRow]:
        """``version``, its parent, grandparent, ... down to the root (without weights)."""
        ...

    # -- strategy, rollout, settings -------------------------------------------------------

    def put_strategy_state(self, state: StrategyStateRow) -> None: ...

    def get_strategy_state(self, name: str) -> StrategyStateRow | None: ...

    def put_rollout_state(self, name: str, state: Mapping[str, Any]) -> None: ...

    def get_rollout_state(self, name: str) -> dict[str, Any] | None: ...

    def put_setting(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` under ``key``."""

    def get_setting(self, key: str, default: Any = None) -> Any: ...
