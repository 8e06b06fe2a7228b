"""Local differential privacy on the device (optional): clip the update, add Gaussian noise, then encode.

The device releases ``clip(Δ, C) + N(0, (z C)^2 I)`` instead of its delta ``Δ`` (every aggregated
tensor, as one vector). Any two deltas a device could compute, from any two datasets, lie in the
ball of radius ``C`` after clipping, so they differ by at most ``2C``: one release is a Gaussian
mechanism with ``μ = 2C / (zC) = 2/z`` in the μ-GDP sense (Dong, Roth, Su 2019), and ``k`` releases by
the same device compose exactly to ``μ√k``. :func:`local_epsilon` turns that into the tight
(ε, δ) of the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8):
``δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)``. Nothing here trusts the server: this guarantee holds
against whoever reads the UPDATE. The price is noise of ``zC`` on *each* device's update (central
DP adds ``zC`` once to the sum), so useful accuracy needs far more devices.

Order in the agent: training → delta → :meth:`LocalDP.privatize` → codec with error feedback (the
codec and its residual are post-processing of the privatized delta and cost no privacy).
Pure math with ``math`` and numpy only (devices install no scipy); randomness is an injected
``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError, ContractViolation

__all__ = ["LocalDP", "LocalDPConfig", "clip_update", "gaussian_delta", "gaussian_epsilon", "local_epsilon"]

Tensors = dict[str, np.ndarray]
_MARGIN = 1e-9


def _phi(x: float) -> float:
    """Standard normal CDF (erfc keeps precision far into the lower tail)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact δ(ε) of a μ-GDP (Gaussian) mechanism, for ``μ > 0``, ``ε >= 0``."""
    if not (mu > 0 and math.isfinite(mu)) or not epsilon >= 0:
        raise ValueError(f"need mu > 0 and epsilon >= 0, got mu={mu!r}, epsilon={epsilon!r}")
    lower = _phi(-epsilon / mu - mu / 2.0)
    tail = math.exp(epsilon) * lower if lower > 0 else 0.0
    return max(0.0, _phi(-epsilon / mu + mu / 2.0) - tail)


def gaussian_epsilon(mu: float, delta: float, *, tol: float = 1e-9) -> float:
    """Smallest ε (to ``tol``, rounded up) with ``gaussian_delta(mu, ε) <= delta``."""
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(mu, high) > delta:
        low, high = high, high * 2.0
    while high - low > tol:
        mid = (low + high) / 2.0
        low, high = (low, mid) if gaussian_delta(mu, mid) <= delta else (mid, high)
    return high


def local_epsilon(noise_multiplier: float, delta: float, rounds: int = 1) -> float:
    """ε of one device after ``rounds`` privatized updates (clip C, noise zC; replace-one, sensitivity 2C)."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return gaussian_epsilon(2.0 / noise_multiplier * math.sqrt(rounds), delta)


def clip_update(update: Mapping[str, np.ndarray], clip: float) -> Tensors:
    """``update`` scaled to L2 norm (all tensors together) at most ``clip``, as float64 copies.

    ``ContractViolation`` for NaN/inf values (nothing is released for a broken update).
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    out = {name: np.array(value, dtype=np.float64) for name, value in update.items()}
    squares = 0.0
    for name, value in out.items():
        if not np.all(np.isfinite(value)):
            raise ContractViolation(f"update tensor {name!r} has non-finite values")
        squares += float(np.vdot(value, value))
    norm = math.sqrt(squares)
    # a 1e-9 relative margin: the bound holds however the norm is summed (rounding order)
    target = clip * (1.0 - _MARGIN)
    if norm <= target:
        return out
    factor = target / norm
    while math.sqrt(sum(float(np.vdot(v * factor, v * factor)) for v in out.values())) > clip:
        factor = math.nextafter(factor, 0.0)
    return {name: value * factor for name, value in out.items()}


@dataclass(frozen=True, kw_only=True)
class LocalDPConfig:
    """The agent's ``[privacy]`` table: ``clip_norm`` C, ``noise_multiplier`` z, ``delta`` for the stated ε."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("clip_norm", "noise_multiplier"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value > 0 and math.isfinite(value))
            ):
                raise ConfigError(f"privacy.{key} must be a positive number, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not (0.0 < self.delta < 1.0):
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> LocalDPConfig:
        unknown = sorted(set(table) - {"clip_norm", "noise_multiplier", "delta"})
        if unknown:
            raise ConfigError(f"privacy.{unknown[0]}: unknown key (known: clip_norm, delta, noise_multiplier)")
        for key in ("clip_norm", "noise_multiplier"):
            if key not in table:
                raise ConfigError(f"privacy.{key} is required for local DP")
        return cls(
            clip_norm=table["clip_norm"], noise_multiplier=table["noise_multiplier"], delta=table.get("delta", 1e-5)
        )


class LocalDP:
    """Privatizes a device's delta before it is encoded; ``rng`` is the device's noise source."""

    def __init__(self, config: LocalDPConfig, *, rng: np.random.Generator) -> None:
        self.config = config
        self._rng = rng

    @property
    def noise_stddev(self) -> float:
        return self.config.noise_multiplier * self.config.clip_norm

    def privatize(self, update: Mapping[str, np.ndarray]) -> Tensors:
        """``clip(update, C) + N(0, (zC)^2)`` per coordinate, as float32 tensors of the same shapes."""
        clipped = clip_update(update, self.config.clip_norm)
        out: Tensors = {}
        for name, value in clipped.items():
            value += self._rng.normal(0.0, self.noise_stddev, size=value.shape)
            out[name] = value.astype(np.float32)
        return out

    def epsilon(self, rounds: int = 1) -> float:
        """This device's ε at the configured δ after ``rounds`` privatized updates (1: per round)."""
        return local_epsilon(self.config.noise_multiplier, self.config.delta, rounds)
