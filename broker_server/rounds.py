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

**A buffered round after a restart** (:class:`Refill`). The store keeps a round's accepted task
ids and its streaming checkpoint — the weighted sums of exactly those updates — but not the
updates themselves, which a buffered rule needs as rows. The restored round's ``refill`` lists
those tasks; the engine sends their TASKs again, each agent answers a task id it has already
answered with its stored result (``Agent._accept_task``), and :meth:`RoundState.accept_update`
turns such a re-sent update into a buffer row *only*: it is not counted, journaled, weighed into
the mean or the metrics again (it returns False, like a duplicate). :meth:`Refill.verify` then
checks the re-collected rows against the stored sums, so a device cannot swap its update.

**Update binding** (:mod:`edge_agent.protocol.binding`). Every task has a :class:`TaskBinding`
(its nonce and the digest of the weights payload it was sent with) in :attr:`RoundState.bindings`;
an update must echo both. Refusals carry their own codes: ``replayed`` (a result for a round
that is over, or — :meth:`RoundState.check_late` — a copy of an update its closed round already
counted), ``cross_round`` (a (round, task) pair this round did not issue), ``cross_device``,
``bad_nonce`` and ``wrong_base`` (base digest or model version). A copy of an accepted update
arriving while its round is still collecting is a QoS 1 duplicate: ignored, not refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.robust import BufferFull, UpdateBuffer
from edge_agent.codecs import CodecSpec, payload_codec
from edge_agent.errors import ContractViolation, FedflockError
from edge_agent.protocol.binding import (
    BindingRefused,
    CrossDevice,
    CrossRound,
    Replayed,
    TaskBinding,
    WrongBase,
    binding_refusal,
    new_nonce,
)
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

#: An update claiming more examples than this is rejected (protects the weighting).
MAX_EXAMPLES_PER_UPDATE = 10_000_000
#: relative tolerance of :meth:`Refill.verify`: the same updates folded again, in other groups of
#: the float32 group sum (edge_agent/codecs/partial.py: within (G+1)·2**-24 ≈ 5.4e-7 of the summed
#: magnitudes per element for G = 8, and cancellation can make a sum smaller than its terms); a
#: device re-sending a *different* update moves its tensors by far more than this
REFILL_RTOL = 1e-4


def other_round(round_: int, collecting: int) -> BindingRefused:
    """The refusal of a result for ``round_`` while the server collects round ``collecting``."""
    if round_ < collecting:
        return Replayed(f"result for round {round_}, which is over (the server collects round {collecting})")
    return CrossRound(f"result for round {round_}, the server collects round {collecting}")


def bind_tasks(
    tasks: dict[str, str], base_digest: str, *, nonce: Callable[[], str] = new_nonce
) -> dict[str, TaskBinding]:
    """A fresh nonce for every task id, all sent the weights payload whose digest is ``base_digest``."""
    return {task_id: TaskBinding(nonce=nonce(), base_digest=base_digest) for task_id in tasks}


@dataclass
class Refill:
    """Rows of updates accepted before a restart, to be collected again (see the module docstring)."""

    #: task id -> device id of the accepted updates whose rows are still missing
    pending: dict[str, str]
    #: the stored checkpoint: the weighted sums of exactly those updates
    expected: WeightedMean
    #: the same sums over the updates re-collected so far
    received: WeightedMean = field(default_factory=WeightedMean)

    @classmethod
    def of(cls, tasks: dict[str, str], accepted: set[str], mean: WeightedMean) -> Refill:
        """The refill of a restored round whose ``mean`` holds the ``accepted`` updates."""
        expected = WeightedMean.restore(mean.sums(), total_weight=mean.total_weight, count=mean.count)
        return cls(pending={task_id: tasks[task_id] for task_id in sorted(accepted)}, expected=expected)

    def verify(self) -> str:
        """Why the re-collected updates are not the ones stored ("" if they are; call once none is pending)."""
        got, want = self.received, self.expected
        if got.count != want.count or not np.isclose(got.total_weight, want.total_weight, rtol=REFILL_RTOL, atol=0):
            return (
                f"{got.count} re-sent updates weigh {got.total_weight:g}, the {want.count} stored before the "
                f"restart weighed {want.total_weight:g}"
            )
        received = got.sums()
        for name, value in want.sums().items():
            scale = float(np.abs(value).max()) if value.size else 0.0
            if not np.allclose(received[name], value, rtol=REFILL_RTOL, atol=REFILL_RTOL * scale):
                return f"the re-sent updates differ from those accepted before the restart (tensor {name!r})"
        return ""


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
    #: a restored buffered round: the accepted updates whose rows must be collected again
    refill: Refill | None = None
    #: task id -> its nonce and base digest (a task without an entry was issued unbound)
    bindings: dict[str, TaskBinding] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.examples < 0:
            self.examples = int(self.mean.total_weight)

    @property
    def finished(self) -> bool:
        return len(self.accepted) + len(self.failed) >= len(self.tasks)

    @property
    def num_examples(self) -> int:
        return self.examples

    def _check_issued(self, device_id: str, task_id: str, round_: int) -> None:
        """Raise for a result that this round did not ask ``device_id`` for."""
        if round_ != self.round:
            raise other_round(round_, self.round)
        owner = self.tasks.get(task_id)
        if owner is None:
            raise CrossRound(f"task {task_id!r} is not a task of round {self.round}")
        if owner != device_id:
            raise CrossDevice(f"task {task_id!r} was issued to {owner!r}, not {device_id!r}")

    def check_binding(self, update: UpdateMessage) -> None:
        """Raise unless ``update`` echoes its task's nonce and base digest (the task is this round's)."""
        refusal = binding_refusal(
            device_id=update.device_id,
            nonce=update.nonce,
            base_digest=update.base_digest,
            owner=self.tasks[update.task_id],
            binding=self.bindings.get(update.task_id, TaskBinding()),
            task_id=update.task_id,
        )
        if refusal is not None:
            raise refusal

    def check_late(self, message: UpdateMessage | ErrorMessage) -> bool:
        """For a result of this round after it closed: True if its task has no result yet (route it
        as late), False for a repeated ERROR; raises for an unbound update and ``Replayed`` for an
        update of a task the round counted (its aggregate is closed: a copy now is a replay)."""
        self._check_issued(message.device_id, message.task_id, message.round)
        counted = message.task_id in self.accepted or message.task_id in self.failed
        if isinstance(message, UpdateMessage):
            self.check_binding(message)
            if counted:
                raise Replayed(f"task {message.task_id!r} was counted in round {self.round}, which has closed")
        return not counted

    def _check_task(self, device_id: str, task_id: str, round_: int) -> bool:
        """True if new; False for a duplicate; raises for anything not issued to this device."""
        self._check_issued(device_id, task_id, round_)
        if task_id in self.accepted or task_id in self.failed:
            self.duplicates += 1
            return False
        return True

    def accept_update(self, update: UpdateMessage) -> bool:
        """Fold ``update`` into the mean. False if it is a duplicate (or a refilled row); raises if unacceptable."""
        refill = self.refill
        if refill is not None and update.task_id in refill.pending:
            self._check_issued(update.device_id, update.task_id, update.round)
            self.check_binding(update)
            self._refill_row(refill, update, self._weight(update))
            return False
        self._check_issued(update.device_id, update.task_id, update.round)
        self.check_binding(update)
        if not self._check_task(update.device_id, update.task_id, update.round):
            return False
        weight = self._weight(update)
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

    def _refill_row(self, refill: Refill, update: UpdateMessage, weight: float) -> None:
        """A re-sent update accepted before the restart: a buffer row, nothing counted again."""
        if self.buffer is None:
            raise ContractViolation(f"task {update.task_id!r}: a refill needs the round's update buffer")
        try:
            self.buffer.add_encoded(update.device_id, update.payload, weight)
        except BufferFull as exc:
            raise ContractViolation(exc.reason) from exc
        refill.received.add_encoded(update.payload, weight, {spec.name: spec.shape for spec in self.specs})
        del refill.pending[update.task_id]

    def _weight(self, update: UpdateMessage) -> float:
        """``num_examples x`` the device's trust multiplier; raises if the update is unacceptable."""
        if update.model_version != self.model_version:
            raise WrongBase(f"update is based on model v{update.model_version}, task was v{self.model_version}")
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
        return float(update.num_examples) * multiplier

    def record_error(self, error: ErrorMessage) -> bool:
        if not self._check_task(error.device_id, error.task_id, error.round):
            return False
        self.failed[error.task_id] = f"{error.code}: {error.reason}"
        return True

    def mean_metrics(self) -> dict[str, float]:
        total = self.examples
        return {key: value / total for key, value in self.metric_sums.items()} if total else {}
