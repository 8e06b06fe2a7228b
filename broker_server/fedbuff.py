"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): pure logic, no I/O.

Devices train on whatever model version they hold and upload whenever they finish
(docs/protocol.md §8.4). :class:`FedBuff` folds every acceptable update into a buffer with
weight ``num_examples × staleness_weight(s)``, where the staleness ``s`` is how many versions the
global model moved on since the device's base version; once the buffer holds ``buffer_size``
updates it is *sealed*: its weighted mean delta becomes the next model version. The caller takes
sealed buffers with :meth:`FedBuff.flush`, applies each delta
(:func:`broker_server.aggregate.apply_delta`) and publishes the result.

Thread safety: every method takes one lock, so several transport threads may :meth:`~FedBuff.offer`
concurrently. The duplicate check, the fold, the seal and the version bump happen under that
lock, so an accepted update is in exactly one sealed buffer and each version is produced once.
(Decoding happens under the lock too; updates are small next to the network time they took.)

Duplicates: at most one update per ``(device_id, task_id)`` is accepted, whatever its attempt; a
copy is ``duplicate`` while its contribution is in the open buffer and ``replayed`` once that
buffer was sealed. Binding (:mod:`broker_server.update_binding`): with a task table an update must
also echo its TASK's nonce, base digest and round (``bad_nonce``, ``wrong_base``, ``cross_round``,
``cross_device``).
Accepted keys are remembered up to ``max_remembered_keys`` (oldest forgotten first). With a task
table (``task_of``: every update must carry the device and model version its task was issued
with) a key is also forgotten once its version is more than ``max_staleness`` behind, because any
replay of it is then refused as ``stale``: memory stays bounded by the staleness window and the
at-most-once guarantee holds however long the server runs. Without a task table a device that
replays a task forgotten by capacity under a fresher model version could be counted again, so
production wiring should pass ``task_of``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.rounds import MAX_EXAMPLES_PER_UPDATE
from broker_server.staleness import ConstantStaleness, HingeStaleness, PolynomialStaleness, StalenessFn
from broker_server.update_binding import IssuedTask, issued_refusal
from edge_agent.codecs import CodecSpec, payload_codec
from edge_agent.errors import ConfigError, ContractViolation, FedflockError, ProtocolError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

__all__ = [
    "Accepted",
    "BufferCheckpoint",
    "BufferResult",
    "ConstantStaleness",
    "Contribution",
    "FedBuff",
    "FedBuffConfig",
    "HingeStaleness",
    "IssuedTask",
    "PolynomialStaleness",
    "Rejected",
    "StalenessFn",
]

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class FedBuffConfig:
    #: updates per buffer (FedBuff's K): a new model version every ``buffer_size`` accepted updates
    buffer_size: int = 10
    #: updates more than this many versions behind the current model are refused ("stale")
    max_staleness: int = 8
    staleness: StalenessFn = field(default_factory=PolynomialStaleness)
    #: codec names (``CodecSpec.name``) the async tasks offer
    codecs: frozenset[str] = frozenset({"fp32"})
    #: accepted (device_id, task_id) keys kept for duplicate detection (oldest forgotten first)
    max_remembered_keys: int = 1_000_000

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError("buffer_size must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0")
        if self.max_remembered_keys < self.buffer_size:
            raise ConfigError("max_remembered_keys must be >= buffer_size")
        if not self.codecs:
            raise ConfigError("codecs must name at least one update codec")
        for name in self.codecs:
            if CodecSpec.parse(name).name != name:
                raise ConfigError(f"codecs holds codec names (e.g. 'topk-int8'), not specs: {name!r}")
        # a weight of 0, > 1 or NaN would silently corrupt the mean: refuse such a function up front
        for s in range(self.max_staleness + 1):
            factor = self.staleness(s)
            if not (math.isfinite(factor) and 0.0 < factor <= 1.0):
                raise ConfigError(f"staleness weight for s={s} must be in (0, 1], got {factor}")


# -- outcomes ------------------------------------------------------------------------------------

RejectReason = Literal[
    "duplicate", "unknown_task", "future_version", "stale", "invalid",
    "replayed", "cross_round", "cross_device", "bad_nonce", "wrong_base",
]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Accepted:
    staleness: int
    weight: float
    #: the version this update's buffer will produce
    version: int
    #: True when a sealed buffer is waiting for :meth:`FedBuff.flush`
    ready: bool


@dataclass(frozen=True, kw_only=True)
class Rejected:
    reason: RejectReason
    detail: str
    #: the :mod:`edge_agent.errors` code for ``invalid`` updates (e.g. ``contract_violation``)
    error_code: str | None = None


@dataclass(frozen=True, kw_only=True)
class Contribution:
    device_id: str
    task_id: str
    model_version: int
    #: versions behind when the update arrived (FedBuff measures staleness on arrival)
    staleness: int
    num_examples: int
    #: ``num_examples × staleness_weight(staleness)``
    weight: float


@dataclass(frozen=True, kw_only=True)
class BufferResult:
    #: the model version this buffer produces: ``base_version + 1``
    version: int
    #: the version ``mean_delta`` is to be applied to
    base_version: int
    mean_delta: Tensors
    contributors: tuple[Contribution, ...]
    total_weight: float
    num_examples: int
    #: example-weighted means of the updates' metrics
    train_metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True, eq=False)
class BufferCheckpoint:
    """The open buffer as it stands (:meth:`FedBuff.snapshot`), or a sealed one
    (:meth:`BufferCheckpoint.of_result`): what a server stores to survive a restart."""

    #: the version the buffer's mean is applied to
    base_version: int
    #: float64 weighted sums ``sum(w_i * delta_i)`` ({} while empty)
    sums: Tensors
    total_weight: float
    contributors: tuple[Contribution, ...]
    #: example-weighted metric sums
    metric_sums: dict[str, float]
    num_examples: int

    @classmethod
    def of_result(cls, result: BufferResult) -> BufferCheckpoint:
        """A sealed buffer as a checkpoint (its sums are ``mean_delta × total_weight``)."""
        total = result.total_weight
        return cls(
            base_version=result.base_version,
            sums={name: value.astype(np.float64) * total for name, value in result.mean_delta.items()},
            total_weight=total,
            contributors=result.contributors,
            metric_sums={k: v * result.num_examples for k, v in result.train_metrics.items()},
            num_examples=result.num_examples,
        )


@dataclass
class _Buffer:
    mean: WeightedMean
    contributors: list[Contribution] = field(default_factory=list)
    metric_sums: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0


# -- the buffer ----------------------------------------------------------------------------------


class FedBuff:
    """Thread-safe buffered asynchronous aggregation.

    ``version`` is the current global model version (the one the next sealed buffer is applied
    to). ``task_of`` maps a task id to the task as issued (``None``: unknown); when given, an
    update must come from the device the task was issued to and carry the task's model version.
    """

    def __init__(
        self,
        config: FedBuffConfig,
        specs: tuple[TensorSpec, ...],
        *,
        version: int = 0,
        task_of: Callable[[str], IssuedTask | None] | None = None,
        mean_factory: Callable[[], WeightedMean] = WeightedMean,
    ) -> None:
        """``mean_factory`` makes each buffer's mean (e.g. a clipping one for the ``clip`` rule)."""
        if version < 0:
            raise ConfigError("version must be >= 0")
        self.config = config
        self._expected = {spec.name: spec.shape for spec in specs}
        if not self._expected:
            raise ConfigError("FedBuff needs at least one aggregated tensor")
        self._task_of = task_of
        self._lock = threading.Lock()
        self._version = version
        self._new_mean = mean_factory
        self._buffer = _Buffer(mean_factory())
        self._ready: deque[BufferResult] = deque()
        #: (device_id, task_id) -> the update's model version, for accepted updates
        self._seen: dict[tuple[str, str], int] = {}
        self._rejections: dict[str, int] = {}

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def pending(self) -> int:
        """Updates in the open (not yet sealed) buffer."""
        with self._lock:
            return self._buffer.mean.count

    @property
    def ready(self) -> int:
        """Sealed buffers waiting for :meth:`flush`."""
        with self._lock:
            return len(self._ready)

    def rejections(self) -> dict[str, int]:
        """How many offers were refused, per reason."""
        with self._lock:
            return dict(self._rejections)

    def offer(self, update: UpdateMessage, *, current_version: int | None = None) -> Accepted | Rejected:
        """Fold ``update`` into the open buffer, or say why not; never raises for a bad update.

        ``current_version`` is the global version as the caller sees it. The buffer's own version
        wins when it is newer (a seal the caller has not applied yet); a newer caller version (the
        model moved on outside this buffer, e.g. a synchronous round) is adopted. Versions never
        go backwards, so a caller with a stale view cannot make two buffers claim one version.
        """
        with self._lock:
            if current_version is not None and current_version > self._version:
                self._version = current_version
                self._forget_old_keys()
            outcome = self._offer_locked(update)
            if isinstance(outcome, Rejected):
                self._rejections[outcome.reason] = self._rejections.get(outcome.reason, 0) + 1
            return outcome

    def flush(self, *, partial: bool = False) -> BufferResult | None:
        """The oldest sealed buffer, or ``None`` if none is sealed.

        With ``partial=True`` a non-empty open buffer is sealed early when nothing else is ready
        (e.g. at shutdown or when the buffer waited too long), so no accepted update is left behind.
        """
        with self._lock:
            if not self._ready and partial and self._buffer.mean.count:
                self._seal()
            return self._ready.popleft() if self._ready else None

    def snapshot(self) -> BufferCheckpoint:
        """The open buffer (sealed ones not flushed yet are not in it: take them with :meth:`flush`)."""
        with self._lock:
            buffer = self._buffer
            return BufferCheckpoint(
                base_version=self._version,
                sums=buffer.mean.sums(),
                total_weight=buffer.mean.total_weight,
                contributors=tuple(buffer.contributors),
                metric_sums=dict(buffer.metric_sums),
                num_examples=buffer.num_examples,
            )

    def restore(self, checkpoint: BufferCheckpoint) -> None:
        """Continue from ``checkpoint`` (a restart): its updates count as accepted (replays are
        duplicates), and a checkpoint holding ``buffer_size`` updates is sealed at once."""
        with self._lock:
            if self._buffer.mean.count or self._ready:
                raise ValueError("restore() needs an empty FedBuff")
            if checkpoint.base_version < self._version:
                raise ValueError(f"checkpoint is based on v{checkpoint.base_version}, FedBuff is at v{self._version}")
            self._version = checkpoint.base_version
            count = len(checkpoint.contributors)
            if count:
                self._buffer.mean.load(checkpoint.sums, total_weight=checkpoint.total_weight, count=count)
            self._buffer.contributors = list(checkpoint.contributors)
            self._buffer.metric_sums = dict(checkpoint.metric_sums)
            self._buffer.num_examples = checkpoint.num_examples
            for c in checkpoint.contributors:
                self._seen[(c.device_id, c.task_id)] = c.model_version
            if count >= self.config.buffer_size:
                self._seal()

    # -- internals (lock held) -------------------------------------------------------------------

    def _offer_locked(self, update: UpdateMessage) -> Accepted | Rejected:
        key = (update.device_id, update.task_id)
        if self._task_of is not None:
            task = self._task_of(update.task_id)
            if task is None:
                detail = f"task {update.task_id!r} was not issued (or is long forgotten)"
                return Rejected(reason="unknown_task", detail=detail, error_code="contract_violation")
            refused = issued_refusal(update, task)
            if refused is not None:
                return Rejected(reason=cast(RejectReason, refused[0]), detail=refused[1], error_code=refused[0])
        if key in self._seen:  # a copy: a QoS 1 duplicate while its buffer is open, a replay once it is sealed
            sealed = all(c.task_id != update.task_id for c in self._buffer.contributors)
            detail = f"task {update.task_id!r} already contributed" + (" to a sealed buffer" if sealed else "")
            if sealed:
                return Rejected(reason="replayed", detail=detail, error_code="replayed")
            return Rejected(reason="duplicate", detail=detail)
        staleness = self._version - update.model_version
        if staleness < 0:
            detail = f"update is based on v{update.model_version}, the current version is v{self._version}"
            return Rejected(reason="future_version", detail=detail, error_code="contract_violation")
        if staleness > self.config.max_staleness:
            detail = f"staleness {staleness} > max {self.config.max_staleness} (v{update.model_version})"
            return Rejected(reason="stale", detail=detail)
        if not 1 <= update.num_examples <= MAX_EXAMPLES_PER_UPDATE:
            detail = f"num_examples {update.num_examples} not in 1..{MAX_EXAMPLES_PER_UPDATE}"
            return Rejected(reason="invalid", detail=detail, error_code="contract_violation")
        weight = update.num_examples * self.config.staleness(staleness)
        try:
            self._check_codec(update)
            self._buffer.mean.add_encoded(update.payload, weight, self._expected)
        except ProtocolError as exc:
            return Rejected(reason="invalid", detail=exc.reason, error_code=exc.code)
        buffer = self._buffer
        for name, value in update.metrics.items():
            buffer.metric_sums[name] = buffer.metric_sums.get(name, 0.0) + value * update.num_examples
        buffer.num_examples += update.num_examples
        buffer.contributors.append(
            Contribution(
                device_id=update.device_id,
                task_id=update.task_id,
                model_version=update.model_version,
                staleness=staleness,
                num_examples=update.num_examples,
                weight=weight,
            )
        )
        self._seen[key] = update.model_version
        if len(self._seen) > self.config.max_remembered_keys:
            del self._seen[next(iter(self._seen))]
        version = self._version + 1
        if buffer.mean.count >= self.config.buffer_size:
            self._seal()
        return Accepted(staleness=staleness, weight=weight, version=version, ready=bool(self._ready))

    def _check_codec(self, update: UpdateMessage) -> None:
        try:
            codec = CodecSpec.parse(update.codec).name
        except FedflockError as exc:
            raise ContractViolation(f"update codec: {exc.reason}") from exc
        if codec not in self.config.codecs:
            raise ContractViolation(f"update codec {codec!r} was not offered (accepted: {sorted(self.config.codecs)})")
        declared = payload_codec(update.payload)  # MalformedMessage for a bad FFCU header
        if declared != codec:
            raise ContractViolation(f"UPDATE says codec {codec!r}, its payload is {declared!r}")

    def _seal(self) -> None:
        buffer, self._buffer = self._buffer, _Buffer(self._new_mean())
        total = buffer.mean.total_weight
        self._ready.append(
            BufferResult(
                version=self._version + 1,
                base_version=self._version,
                mean_delta=buffer.mean.result(),
                contributors=tuple(buffer.contributors),
                total_weight=total,
                num_examples=buffer.num_examples,
                train_metrics={k: v / buffer.num_examples for k, v in buffer.metric_sums.items()},
            )
        )
        self._version += 1
        self._forget_old_keys()

    def _forget_old_keys(self) -> None:
        if self._task_of is None:
            return  # a replay could claim a fresher version: only capacity forgets
        # replays must carry the issued version, now more than max_staleness behind: refused as stale
        oldest = self._version - self.config.max_staleness
        for key in [key for key, based_on in self._seen.items() if based_on < oldest]:
            del self._seen[key]
