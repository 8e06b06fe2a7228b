"""Aggregation math: pure numpy, no I/O.

FedAvg weights every update by its example count. :class:`WeightedMean` folds updates in as they
arrive, so memory is one float64 accumulator per tensor whatever the number of devices, plus at
most ``group - 1`` validated payloads (and at most ``group_bytes`` of them) waiting to be folded
together: a group fold streams each accumulator through the cache once per group, not once per
update (:mod:`edge_agent.codecs.fold`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from edge_agent.codecs import UpdateInfo
from edge_agent.codecs.decode import PreparedUpdate, fold_updates, prepare_update
from edge_agent.codecs.fold import Folder

Tensors = dict[str, np.ndarray]

GROUP = 8  # encoded updates folded together (4, 8 and 16 measured alike; docs/benchmarks.md, issue #6 section)
GROUP_BYTES = 64 << 20  # at most this much payload data waits for a group (big models fold one by one)


class WeightedMean:
    """Streaming weighted mean of tensor sets: ``sum(w_i * t_i) / sum(w_i)``.

    Encoded updates are validated in full when added (a bad one raises and changes nothing) and
    folded ``group`` at a time, or sooner once the waiting payload data reaches ``group_bytes``.
    Waiting updates are already counted in :attr:`count` and :attr:`total_weight`; every read of the
    sums (:meth:`sums`, :meth:`result`, :meth:`flush`) and :meth:`add` fold them first.
    ``group=1`` folds every update as it is added.
    """

    def __init__(self, *, group: int = GROUP, group_bytes: int = GROUP_BYTES) -> None:
        if group < 1 or group_bytes < 0:
            raise ValueError(f"need group >= 1 and group_bytes >= 0, got group={group}, group_bytes={group_bytes}")
        self._sums: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0
        self.group = group
        self.group_bytes = group_bytes
        self._folder = Folder()
        self._pending: list[PreparedUpdate] = []
        self._pending_bytes = 0

    @property
    def waiting(self) -> int:
        """Validated encoded updates not yet folded into the sums (counted already)."""
        return len(self._pending)

    def flush(self) -> None:
        """Fold the validated updates still waiting for their group (a no-op when none are)."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            fold_updates(pending, self._sums, self._folder)

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
        if self.group > 1 and not isinstance(payload, bytes):
            payload = bytes(payload)  # it waits for its group: the caller may reuse a mutable buffer
        prepared = prepare_update(payload, self._sums, weight, expected)
        self._pending.append(prepared)
        self._pending_bytes += prepared.held_bytes
        if len(self._pending) >= self.group or self._pending_bytes >= self.group_bytes:
            self.flush()
        self.total_weight += weight
        self.count += 1
        return prepared.info

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
        self._pending, self._pending_bytes = [], 0  # superseded by the checkpoint, like the sums
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
