"""One synchronous round's bookkeeping: which tasks are open, which updates were accepted.

Pure logic with no I/O, so every acceptance rule is unit-testable: an update is folded into the
streaming mean at most once, only for a task this round issued to that very device, only in a
codec the round offered, and only when every tensor has the model's shape and finite values
(checked by the codec layer before anything is added).

Robust aggregation (:mod:`broker_server.safeguards`) changes only where an accepted update goes
and what it weighs: with a ``buffer`` the update also becomes a row of the round's
:class:`~broker_server.robust.UpdateBuffer`, from which the robust rule computes the round's
delta (a full buffer refuses the update); the streaming ``mean`` is still kept, as the
checkpoint the server store commits with every update (O(model)), but not applied. An update's
weight is ``num_examples × multipliers[device]`` (tiered trust; 1 when the device has no entry).
``num_examples`` and the metrics stay weighted by example counts alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker_server.aggregate import WeightedMean
from broker_server.robust import BufferFull, UpdateBuffer
from edge_agent.codecs import CodecSpec, payload_codec
from edge_agent.errors import ContractViolation, FedflockError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

#: An update claiming more examples than this is rejected (protects the weighting).
MAX_EXAMPLES_PER_UPDATE = 10_000_000


@dataclass
class RoundState:
    round: int
    model_version: int
    #: task id -> device id, for every task this round issued
    tasks: dict[str, str]
    specs: tuple[TensorSpec, ...]
    #: codec names (``CodecSpec.name``) this round's tasks accept
    codecs: frozenset[str] = frozenset({"fp32"})
    mean: WeightedMean = field(default_factory=WeightedMean)
    accepted: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    metric_sums: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    #: robust rules: accepted updates are stored here as rows too, and aggregated from here
    buffer: UpdateBuffer | None = None
    #: tiered trust: device id -> weight multiplier (a device without an entry weighs 1)
    multipliers: dict[str, float] = field(default_factory=dict)
    #: device ids in the order their updates were accepted (since this object was made)
    order: list[str] = field(default_factory=list)
    #: examples behind the accepted updates; -1 takes ``mean.total_weight`` (a restored round,
    #: whose checkpoint keeps only the weight: with trust multipliers that is the weighted total)
    examples: int = -1

    def __post_init__(self) -> None:
        if self.examples < 0:
            self.examples = int(self.mean.total_weight)

    @property
    def finished(self) -> bool:
        return len(self.accepted) + len(self.failed) >= len(self.tasks)

    @property
    def num_examples(self) -> int:
        return self.examples

    def _check_task(self, device_id: str, task_id: str, round_: int) -> bool:
        """True if new; False for a duplicate; raises for anything not issued to this device."""
        if round_ != self.round:
            raise ContractViolation(f"result for round {round_}, current round is {self.round}")
        owner = self.tasks.get(task_id)
        if owner is None:
            raise ContractViolation(f"unknown task id {task_id!r}")
        if owner != device_id:
            raise ContractViolation(f"task {task_id!r} was issued to {owner!r}, not {device_id!r}")
        if task_id in self.accepted or task_id in self.failed:
            self.duplicates += 1
            return False
        return True

    def accept_update(self, update: UpdateMessage) -> bool:
        """Fold ``update`` into the mean. False if it is a duplicate; raises if unacceptable."""
        if not self._check_task(update.device_id, update.task_id, update.round):
            return False
        if update.model_version != self.model_version:
            raise ContractViolation(f"update is based on model v{update.model_version}, task was v{self.model_version}")
        if update.num_examples > MAX_EXAMPLES_PER_UPDATE:
            raise ContractViolation(f"num_examples {update.num_examples} > {MAX_EXAMPLES_PER_UPDATE}")
        try:
            codec = CodecSpec.parse(update.codec).name
        except FedflockError as exc:
            raise ContractViolation(f"update codec: {exc.reason}") from exc
        if codec not in self.codecs:
            raise ContractViolation(f"update codec {codec!r} was not offered (accepted: {sorted(self.codecs)})")
        declared = payload_codec(update.payload)  # MalformedMessage for a bad FFCU header
        if declared != codec:
            raise ContractViolation(f"UPDATE says codec {codec!r}, its payload is {declared!r}")
        multiplier = self.multipliers.get(update.device_id, 1.0)
        if not multiplier > 0:
            raise ContractViolation(f"device {update.device_id!r} has trust weight {multiplier}: not accepted")
        weight = float(update.num_examples) * multiplier
        if self.buffer is not None:
            try:
                self.buffer.add_encoded(update.device_id, update.payload, weight)
            except BufferFull as exc:
                raise ContractViolation(exc.reason) from exc
        expected = {spec.name: spec.shape for spec in self.specs}
        self.mean.add_encoded(update.payload, weight, expected)  # validated in full by the buffer already
        self.examples += update.num_examples
        self.order.append(update.device_id)
        for key, value in update.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value * update.num_examples
        self.accepted.add(update.task_id)
        return True

    def record_error(self, error: ErrorMessage) -> bool:
        if not self._check_task(error.device_id, error.task_id, error.round):
            return False
        self.failed[error.task_id] = f"{error.code}: {error.reason}"
        return True

    def mean_metrics(self) -> dict[str, float]:
        total = self.examples
        return {key: value / total for key, value in self.metric_sums.items()} if total else {}
