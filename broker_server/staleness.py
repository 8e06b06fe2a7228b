"""Staleness weighting for asynchronous aggregation: pure functions of "versions behind".

An update based on a model ``s`` versions older than the current one weighs
``num_examples × f(s)`` in its FedBuff buffer (:mod:`broker_server.fedbuff`), with ``f`` one of:

* :class:`ConstantStaleness` — 1 (plain FedAvg over the buffer);
* :class:`PolynomialStaleness` — ``1 / (1 + s) ** a`` (FedBuff's ``1/√(1+s)`` for ``a = 0.5``);
* :class:`HingeStaleness` — FedAsync's hinge: 1 up to ``b`` versions behind, then
  ``1 / (a·(s − b) + 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.errors import ConfigError

__all__ = ["ConstantStaleness", "HingeStaleness", "PolynomialStaleness", "StalenessFn"]

#: staleness (versions behind, >= 0) -> weight factor in (0, 1]
StalenessFn = Callable[[int], float]


@dataclass(frozen=True, kw_only=True)
class ConstantStaleness:
    """Every admissible update counts fully (plain FedAvg over the buffer)."""

    def __call__(self, staleness: int) -> float:
        return 1.0


@dataclass(frozen=True, kw_only=True)
class PolynomialStaleness:
    """``1 / (1 + s) ** exponent``; the default exponent 0.5 is FedBuff's ``1/sqrt(1+s)``."""

    exponent: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ConfigError(f"staleness exponent must be finite and >= 0, got {self.exponent}")

    def __call__(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.exponent)


@dataclass(frozen=True, kw_only=True)
class HingeStaleness:
    """FedAsync's hinge: 1 up to ``threshold`` versions behind, then ``1 / (slope·(s - threshold) + 1)``."""

    threshold: int = 4
    slope: float = 10.0

    def __post_init__(self) -> None:
        if self.threshold < 0 or not (math.isfinite(self.slope) and self.slope >= 0):
            raise ConfigError("hinge staleness needs threshold >= 0 and a finite slope >= 0")

    def __call__(self, staleness: int) -> float:
        if staleness <= self.threshold:
            return 1.0
        return 1.0 / (self.slope * (staleness - self.threshold) + 1.0)
