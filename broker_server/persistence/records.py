"""What the server store holds, as frozen dataclasses (no I/O here).

Times are wall-clock seconds since the epoch (``time.time()``), never ``time.monotonic()``: they
outlive the process, and a round's deadline must still mean something after a restart.
JSON fields must be JSON-serialisable mappings; tensors are numpy arrays stored in the
fedflock tensor-set format (:mod:`edge_agent.protocol.tensors`), never pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edge_agent.protocol.binding import TaskBinding

__all__ = [
    "AggregateCheckpoint",
    "DeviceRow",
    "ModelVersionRow",
    "RoundRow",
    "RoundSnapshot",
    "RoundStatus",
    "StrategyStateRow",
    "TaskRow",
    "TaskState",
]

Tensors = Mapping[str, np.ndarray]
RoundStatus = Literal["open", "completed", "abandoned"]
TaskState = Literal["open", "accepted", "failed"]


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """A device's registry record (:class:`broker_server.registry.DeviceRecord`) and its counters.

    ``selected``, ``accepted`` and ``failed`` count the device's tasks; the store maintains them
    (in the same transactions as the rounds) and :meth:`ServerStore.upsert_device` ignores them.
    """

    device_id: str
    online: bool
    bundle_digest: str = ""
    num_examples: int = 0
    agent_version: str = ""
    last_seen: float = 0.0
    eligibility: Mapping[str, Any] = field(default_factory=dict)
    selected: int = 0
    accepted: int = 0
    failed: int = 0


@dataclass(frozen=True, kw_only=True)
class RoundRow:
    """One round as it was opened, and how it ended.

    ``tasks`` maps task id -> device id; ``bindings`` task id -> its nonce and base digest (a
    task without an entry was issued unbound). ``config`` is the strategy configuration the round runs
    with (codecs, hyper-parameters, ...; JSON). ``deadline`` is wall-clock.
    """

    round: int
    model_version: int
    tasks: Mapping[str, str]
    deadline: float
    created_at: float
    config: Mapping[str, Any] = field(default_factory=dict)
    status: RoundStatus = "open"
    reason: str = ""
    closed_at: float | None = None
    #: the model version the round produced (completed rounds only)
    result_version: int | None = None
    bindings: Mapping[str, TaskBinding] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TaskRow:
    """One task of a round and its outcome; ``key`` is the idempotency key of its result."""

    task_id: str
    device_id: str
    state: TaskState = "open"
    key: str | None = None
    reason: str = ""
    reported_at: float | None = None
    nonce: str = ""
    base_digest: str = ""


@dataclass(frozen=True, kw_only=True, eq=False)
class AggregateCheckpoint:
    """A round's partial aggregate: what :class:`broker_server.aggregate.WeightedMean` holds.

    ``sums`` are the float64 weighted sums ``sum(w_i * delta_i)``, ``total_weight`` is
    ``sum(w_i)``, ``count`` the number of updates folded in and ``accepted`` their task ids
    (``count == len(accepted)``). ``metric_sums`` are the example-weighted metric sums.
    """

    sums: Tensors = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0
    accepted: frozenset[str] = frozenset()
    metric_sums: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.count != len(self.accepted):
            raise ValueError(f"checkpoint count {self.count} != {len(self.accepted)} accepted task ids")


@dataclass(frozen=True, kw_only=True, eq=False)
class RoundSnapshot:
    """Everything stored about a round: enough to rebuild its ``RoundState`` after a restart."""

    round: RoundRow
    tasks: tuple[TaskRow, ...]
    checkpoint: AggregateCheckpoint

    @property
    def accepted(self) -> frozenset[str]:
        return frozenset(t.task_id for t in self.tasks if t.state == "accepted")

    @property
    def failed(self) -> dict[str, str]:
        return {t.task_id: t.reason for t in self.tasks if t.state == "failed"}


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelVersionRow:
    """A global model version with its lineage: ``parent`` is the version it was trained from.

    The weights are stored inline (``weights``, a tensor set) or referenced (``weights_path``,
    e.g. a bundle directory on shared storage); storing needs at least one. A version read
    without its weights (or stored by path only) has ``weights`` None. ``parent`` must be an
    older stored version (None for the initial model), so lineage never has a cycle.
    """

    version: int
    parent: int | None
    bundle_digest: str
    created_at: float
    round: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    weights: Tensors | None = None
    weights_path: str | None = None

    def __post_init__(self) -> None:
        if self.parent is not None and self.parent >= self.version:
            raise ValueError(f"model version {self.version}: parent {self.parent} must be older")


@dataclass(frozen=True, kw_only=True, eq=False)
class StrategyStateRow:
    """A server strategy's state between rounds: ``broker_server.strategies.base.StrategyState``
    (``tensors`` = its float64 tensors, ``state`` = its ``meta``) under the strategy's name."""

    name: str
    tensors: Tensors = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)
    round: int | None = None
    updated_at: float = 0.0
