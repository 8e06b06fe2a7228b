"""Aggregation math: pure numpy, no I/O.

FedAvg weights every update by its example count. :class:`WeightedMean` folds updates in as they
arrive, so memory is one float64 accumulator per tensor whatever the number of devices, plus one
float32 partial sum of the current group of at most ``group`` encoded updates and their payloads
(at most ``group_bytes`` of them, kept to re-fold the group should a later member be rejected):
each update is folded into the partial on arrival, while it is in the cache, and every ``group``
updates the partial is added into the float64 sums, which so stream through memory once per group
(:mod:`edge_agent.codecs.partial`: the precision bound, the one-pass NaN/Inf check, the threads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from edge_agent.codecs import UpdateInfo
from edge_agent.codecs.decode import fold_updates, prepare_update
from edge_agent.codecs.fold import Folder
from edge_agent.codecs.partial import GroupSum
from edge_agent.codecs.workers import FoldWorkers

Tensors = dict[str, np.ndarray]

GROUP = 8  # updates per group (4, 8, 16 measured: alike for fp32, 8 best for int8; docs/benchmarks.md, issue #6)
GROUP_BYTES = 64 << 20  # at most this much payload data waits for a group (big models fold one by one)


class WeightedMean:
    """Streaming weighted mean of tensor sets: ``sum(w_i * t_i) / sum(w_i)``.

    Encoded updates are validated in full when added (a bad one raises and changes nothing) and
    folded into the group's partial sum; the group goes into the sums every ``group`` updates, or
    sooner once its payload data reaches ``group_bytes``. Updates of the open group are already
    counted in :attr:`count` and :attr:`total_weight`; every read of the sums (:meth:`sums`,
    :meth:`result`, :meth:`flush`) and :meth:`add` commit the group first. ``group=1`` folds every
    update into the sums as it is added, exactly in float64. ``workers`` threads share each fold
    (default: the usable CPUs, at most 4; the result does not depend on it).
    """

    def __init__(self, *, group: int = GROUP, group_bytes: int = GROUP_BYTES, workers: int | None = None) -> None:
        if group < 1 or group_bytes < 0:
            raise ValueError(f"need group >= 1 and group_bytes >= 0, got group={group}, group_bytes={group_bytes}")
        self._sums: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0
        self.group = group
        self.group_bytes = group_bytes
        self._workers = FoldWorkers(workers)
        self._folder = Folder(workers=self._workers)
        self._group: GroupSum | None = None
        self._pending_bytes = 0

    @property
    def waiting(self) -> int:
        """Updates of the open group, not yet in the sums (counted already)."""
        return len(self._group) if self._group is not None else 0

    def flush(self) -> None:
        """Add the open group into the sums (a no-op when it is empty)."""
        if self._group is not None and len(self._group):
            self._pending_bytes = 0
            self._group.commit(self._sums, self._folder)

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        self.flush()
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sums and set(tensors) != set(self._sums):
            raise ValueError("tensor names differ from earlier updates")
        for name, value in tensors.items():
            acc = self._sums.get(name)
            if acc is None:
                # in-place ops only: ``array * w`` turns a 0-d array into a numpy scalar
                acc = np.array(value, dtype=np.float64)
                acc *= weight
                self._sums[name] = acc
            elif acc.shape != value.shape:
                raise ValueError(f"tensor {name!r}: shape {value.shape} != {acc.shape}")
            else:
                np.add(acc, np.asarray(value, dtype=np.float64) * weight, out=acc)
        self.total_weight += weight
        self.count += 1

    def add_encoded(
        self, payload: bytes | bytearray | memoryview, weight: float, expected: Mapping[str, tuple[int, ...]]
    ) -> UpdateInfo:
        """Fold an encoded update (edge_agent.codecs) in without materialising it as a float copy.

        The payload is validated in full before any accumulator changes, so a bad update leaves
        the mean exactly as it was. With ``group > 1`` the fold itself may wait for the group.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sums and set(expected) != set(self._sums):
            raise ValueError("tensor names differ from earlier updates")
        if not self._sums:
            self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in expected.items()}
        prepared = prepare_update(payload, self._sums, weight, expected, defer_finite=True)
        if self.group == 1 or (not self.waiting and prepared.held_bytes >= self.group_bytes):
            fold_updates([prepared], self._sums, self._folder)  # a group of one: the exact fold, checks first
        else:
            if not isinstance(payload, bytes):  # kept with its group: the caller may reuse a mutable buffer
                prepared = prepare_update(bytes(payload), self._sums, weight, expected, defer_finite=True)
            group = self._open_group()
            group.add(prepared)  # the NaN/Inf check of fp32 values: the group is unchanged if it raises
            self._pending_bytes += prepared.held_bytes
            if len(group) >= self.group or self._pending_bytes >= self.group_bytes:
                self.flush()
        self.total_weight += weight
        self.count += 1
        return prepared.info

    def _open_group(self) -> GroupSum:
        shapes = {name: acc.shape for name, acc in self._sums.items()}
        if self._group is None or self._group.shapes != shapes:
            self.flush()
            self._group = GroupSum(shapes, workers=self._workers)
        return self._group

    def sums(self) -> Tensors:
        """Copies of the float64 weighted sums ``sum(w_i * t_i)`` (a checkpoint of the mean)."""
        self.flush()
        return {name: acc.copy() for name, acc in self._sums.items()}

    @classmethod
    def restore(cls, sums: Mapping[str, np.ndarray], *, total_weight: float, count: int) -> WeightedMean:
        """The mean as checkpointed by :meth:`sums`, ``total_weight`` and ``count``."""
        mean = cls()
        mean.load(sums, total_weight=total_weight, count=count)
        return mean

    def load(self, sums: Mapping[str, np.ndarray], *, total_weight: float, count: int) -> None:
        """Continue from a checkpoint (subclasses with constructor arguments restore through this)."""
        if count < 0 or total_weight < 0 or (count > 0 and not sums):
            raise ValueError(f"inconsistent checkpoint: {count} updates, {len(sums)} sums, weight {total_weight}")
        if self._group is not None:  # superseded by the checkpoint, like the sums
            self._group.discard()
        self._pending_bytes = 0
        self._sums = {name: np.array(value, dtype=np.float64) for name, value in sums.items()}
        self.total_weight = float(total_weight)
        self.count = int(count)

    def result(self) -> Tensors:
        self.flush()
        if self.count == 0:
            raise ValueError("no updates were added")
        return {name: (acc / self.total_weight).astype(np.float32) for name, acc in self._sums.items()}


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Tensors:
    """Weighted mean of ``(tensors, weight)`` pairs (convenience over :class:`WeightedMean`)."""
    mean = WeightedMean()
    for tensors, weight in updates:
        mean.add(tensors, weight)
    return mean.result()


def apply_delta(
    weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], *, server_lr: float = 1.0
) -> Tensors:
    """New global weights: ``w + server_lr * delta`` for tensors in ``delta``, others unchanged."""
    out = {name: np.array(value) for name, value in weights.items()}
    for name, step in delta.items():
        out[name] = (out[name] + server_lr * step).astype(out[name].dtype)
    return out
