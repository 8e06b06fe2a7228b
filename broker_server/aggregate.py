"""Aggregation math: pure numpy, no I/O.

FedAvg weights every update by its example count. :class:`WeightedMean` folds updates in one at a
time, so memory is one float64 accumulator per tensor whatever the number of devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from edge_agent.codecs import UpdateInfo, accumulate_update

Tensors = dict[str, np.ndarray]


class WeightedMean:
    """Streaming weighted mean of tensor sets: ``sum(w_i * t_i) / sum(w_i)``."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
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

    def add_encoded(self, payload: bytes, weight: float, expected: Mapping[str, tuple[int, ...]]) -> UpdateInfo:
        """Fold an encoded update (edge_agent.codecs) in without materialising it as a float copy.

        The payload is validated in full before any accumulator changes, so a bad update leaves
        the mean exactly as it was.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sums and set(expected) != set(self._sums):
            raise ValueError("tensor names differ from earlier updates")
        if not self._sums:
            self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in expected.items()}
        info = accumulate_update(payload, self._sums, weight, expected)
        self.total_weight += weight
        self.count += 1
        return info

    def sums(self) -> Tensors:
        """Copies of the float64 weighted sums ``sum(w_i * t_i)`` (a checkpoint of the mean)."""
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
        self._sums = {name: np.array(value, dtype=np.float64) for name, value in sums.items()}
        self.total_weight = float(total_weight)
        self.count = int(count)

    def result(self) -> Tensors:
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
