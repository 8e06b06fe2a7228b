"""The round's streaming sum under central DP: a drop-in for :class:`~broker_server.aggregate.WeightedMean`.

:class:`DPMean` clips every update through :meth:`CentralDP.clip` and folds it in with weight 1
(memory: one float64 accumulator per tensor, plus one decoded update while it is folded). It
never hands out the exact mean: :meth:`DPMean.release` asks :meth:`CentralDP.finalize` for the
noisy one (charging the round) and :meth:`DPMean.result` returns that release, or raises if
there has been none, so a caller cannot publish an un-noised aggregate by mistake.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from broker_server.aggregate import WeightedMean
from broker_server.privacy.central import CentralDP
from broker_server.privacy.errors import PrivacyError
from edge_agent.codecs import DEFAULT_MAX_ELEMENTS, UpdateInfo, decode_update, parse_update

__all__ = ["DPMean"]

Tensors = dict[str, np.ndarray]


class _Spec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class DPMean(WeightedMean):
    """Sum of clipped updates (weight 1 each) for one round; ``specs``: the aggregated tensors."""

    def __init__(self, dp: CentralDP, specs: Iterable[_Spec]) -> None:
        super().__init__()
        self.dp = dp
        self._sums = {spec.name: np.zeros(tuple(spec.shape), dtype=np.float64) for spec in specs}
        if not self._sums:
            raise ValueError("DPMean needs at least one aggregated tensor")
        self._released: Tensors | None = None

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        """Clip ``tensors`` and add them with weight 1 (``weight``, a device-reported count, is ignored)."""
        self._check_open()
        if set(tensors) != set(self._sums):
            raise ValueError(f"update tensors {sorted(tensors)} differ from the aggregated {sorted(self._sums)}")
        for name, value in tensors.items():
            if np.shape(value) != self._sums[name].shape:
                raise ValueError(f"tensor {name!r}: shape {np.shape(value)} != {self._sums[name].shape}")
        clipped, _ = self.dp.clip(tensors)  # raises (nothing counted) on non-finite values
        super().add(clipped, 1.0)

    def add_encoded(
        self,
        payload: bytes | bytearray | memoryview,
        weight: float,
        expected: Mapping[str, tuple[int, ...]],
        *,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> UpdateInfo:
        """Validate and decode the whole payload, then clip and fold it (all or nothing)."""
        self._check_open()
        info = parse_update(payload, expected, max_elements=max_elements).info
        self.add(decode_update(payload, expected, max_elements=max_elements), weight)
        return info

    def release(self) -> Tensors:
        """The round's noisy mean delta (once; ``BudgetExhausted`` if the round does not fit)."""
        self._check_open()
        self._released = self.dp.finalize(self.sums(), self.count)
        return {name: value.copy() for name, value in self._released.items()}

    def result(self) -> Tensors:
        if self._released is None:
            raise PrivacyError("under central DP the round's mean is only available after release()")
        return {name: value.copy() for name, value in self._released.items()}

    def _check_open(self) -> None:
        if self._released is not None:
            raise PrivacyError("this round's DP mean was already released")
