"""The RDP accountant: what central DP has spent so far, and whether the next round still fits.

A round is a :class:`SampledGaussian` (sampling rate ``q``, noise multiplier ``z``); rounds compose
by adding their RDP curves (:mod:`broker_server.privacy.rdp`), and the total converts to (ε, δ)
with the improved conversion of Balle et al. 2020 (Theorem 21). The accountant never lets the
spent ε pass the budget: :meth:`RdpAccountant.record` refuses a round that would, before
anything is released, so a server that asks :meth:`~RdpAccountant.can_run` first stops cleanly.

:func:`noise_multiplier_for` is the pure calibration: the smallest ``z`` (to a relative
tolerance) whose ``rounds``-fold composition stays within (ε, δ) — it always errs on the safe side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from broker_server.privacy.errors import BudgetExhausted
from broker_server.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_sampled_gaussian
from edge_agent.errors import ConfigError

__all__ = ["PrivacySpent", "RdpAccountant", "SampledGaussian", "epsilon_for", "noise_multiplier_for"]


@dataclass(frozen=True, kw_only=True)
class SampledGaussian:
    """One round's mechanism: each device takes part with probability ``sampling_rate``; the sum
    of clipped updates gets Gaussian noise of ``noise_multiplier`` × clip norm per coordinate."""

    sampling_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (0.0 < self.sampling_rate <= 1.0):
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if not (self.noise_multiplier > 0.0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier!r}")

    def rdp(self, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
        """RDP of one round at ``orders`` (a copy; computed once per mechanism and order list)."""
        return _cached_rdp(self.sampling_rate, self.noise_multiplier, tuple(float(a) for a in orders)).copy()


@lru_cache(maxsize=256)
def _cached_rdp(q: float, z: float, orders: tuple[float, ...]) -> np.ndarray:
    return rdp_sampled_gaussian(q, z, orders)


@dataclass(frozen=True)
class PrivacySpent:
    """(ε, δ) after ``rounds`` rounds, with the RDP order that gave the bound."""

    epsilon: float
    delta: float
    order: float
    rounds: int


def epsilon_for(
    mechanism: SampledGaussian, rounds: int, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """ε of ``rounds`` rounds of ``mechanism`` at ``delta`` (0 for no rounds)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    return epsilon_from_rdp(orders, mechanism.rdp(orders) * rounds, delta)[0]


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    rtol: float = 1e-3,
    max_noise_multiplier: float = 1e4,
) -> float:
    """The smallest noise multiplier (within ``rtol``) for which ``rounds`` rounds at
    ``sampling_rate`` stay within (``target_epsilon``, ``delta``). The returned value always
    meets the target (bisection keeps the feasible end). ``ConfigError`` naming the key when the
    target cannot be met (ε too small for even ``max_noise_multiplier``)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
    if not (0.0 < delta < 1.0):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    if not (0.0 < sampling_rate <= 1.0):
        raise ConfigError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")

    def fits(z: float) -> bool:
        return epsilon_for(SampledGaussian(sampling_rate=sampling_rate, noise_multiplier=z), rounds, delta, orders) <= (
            target_epsilon
        )

    high = 1.0
    while not fits(high):
        high *= 2.0
        if high > max_noise_multiplier:
            raise ConfigError(
                f"target_epsilon {target_epsilon} is out of reach for {rounds} rounds at sampling rate "
                f"{sampling_rate} (would need noise_multiplier > {max_noise_multiplier})"
            )
    low = high / 2.0
    while low > 1e-3 and fits(low):
        high, low = low, low / 2.0
    while high / low - 1.0 > rtol:
        mid = math.sqrt(low * high)
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


class RdpAccountant:
    """Composes rounds and enforces an ε budget at a fixed δ.

    ``mechanism`` is the default round (the server's configured ``q`` and ``z``); a round with
    another mechanism (a different population, say) can be passed explicitly. State is the list
    of recorded rounds, so :meth:`snapshot` / :meth:`restore` are plain JSON values.
    """

    def __init__(
        self,
        mechanism: SampledGaussian,
        *,
        epsilon_budget: float,
        delta: float,
        orders: Sequence[float] = DEFAULT_ORDERS,
    ) -> None:
        if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be positive and finite, got {epsilon_budget!r}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.mechanism = mechanism
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.orders = tuple(float(a) for a in orders)
        self._rdp = np.zeros(len(self.orders), dtype=np.float64)
        #: recorded rounds, run-length encoded: [(sampling_rate, noise_multiplier, count)]
        self._history: list[tuple[float, float, int]] = []

    @property
    def rounds(self) -> int:
        return sum(count for _, _, count in self._history)

    def epsilon(self, steps: int) -> float:
        """ε that ``steps`` rounds of the default mechanism would cost from scratch (a projection)."""
        return epsilon_for(self.mechanism, steps, self.delta, self.orders)

    def spent(self) -> PrivacySpent:
        """(ε, δ) of every round recorded so far."""
        return self._spent_with(self._rdp, self.rounds)

    def can_run(self, next_round: SampledGaussian | None = None) -> bool:
        """True when recording ``next_round`` (default: the accountant's mechanism) stays within budget."""
        mechanism = next_round or self.mechanism
        total = self._rdp + mechanism.rdp(self.orders)
        return self._spent_with(total, self.rounds + 1).epsilon <= self.epsilon_budget

    def remaining_rounds(self, *, limit: int = 1_000_000) -> int:
        """How many more rounds of the default mechanism fit in the budget (at most ``limit``)."""
        per_round = self.mechanism.rdp(self.orders)
        lo, hi = 0, 1
        while hi <= limit and self._fits(per_round, hi):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:  # invariant: lo fits, hi does not (or exceeds limit)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._fits(per_round, mid) else (lo, mid)
        return lo

    def record(self, next_round: SampledGaussian | None = None) -> PrivacySpent:
        """Compose one round; ``BudgetExhausted`` (and nothing recorded) if it would pass the budget."""
        mechanism = next_round or self.mechanism
        if not self.can_run(mechanism):
            spent = self.spent()
            raise BudgetExhausted(
                f"privacy budget ε={self.epsilon_budget} (δ={self.delta}) would be exceeded by round "
                f"{spent.rounds + 1} (spent ε={spent.epsilon:.4f})"
            )
        self._add(mechanism, 1)
        return self.spent()

    def snapshot(self) -> dict[str, Any]:
        return {"rounds": [[q, z, count] for q, z, count in self._history]}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the recorded rounds with ``snapshot``'s (from :meth:`snapshot`)."""
        entries = snapshot.get("rounds")
        if not isinstance(entries, list):
            raise ValueError("accountant snapshot lacks its 'rounds' list")
        parsed = []
        for entry in entries:
            if not (isinstance(entry, list | tuple) and len(entry) == 3 and int(entry[2]) == entry[2] > 0):
                raise ValueError(f"bad accountant snapshot entry {entry!r}")
            parsed.append((SampledGaussian(sampling_rate=float(entry[0]), noise_multiplier=float(entry[1])), entry[2]))
        self._rdp = np.zeros(len(self.orders), dtype=np.float64)
        self._history = []
        for mechanism, count in parsed:
            self._add(mechanism, int(count))

    def _add(self, mechanism: SampledGaussian, count: int) -> None:
        self._rdp = self._rdp + mechanism.rdp(self.orders) * count
        key = (mechanism.sampling_rate, mechanism.noise_multiplier)
        if self._history and self._history[-1][:2] == key:
            self._history[-1] = (*key, self._history[-1][2] + count)
        else:
            self._history.append((*key, count))

    def _fits(self, per_round: np.ndarray, steps: int) -> bool:
        return self._spent_with(self._rdp + per_round * steps, self.rounds + steps).epsilon <= self.epsilon_budget

    def _spent_with(self, rdp: np.ndarray, rounds: int) -> PrivacySpent:
        if rounds == 0:
            return PrivacySpent(0.0, self.delta, math.nan, 0)
        epsilon, order = epsilon_from_rdp(self.orders, rdp, self.delta)
        return PrivacySpent(epsilon, self.delta, order, rounds)
