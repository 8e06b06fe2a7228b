"""Central DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2021).

Per round, with ``m`` = clients per round (the *fixed* denominator) and clip norm ``C``:

1. every accepted update (the manifest's aggregated tensors, all of them together as one
   vector) is scaled to L2 norm at most ``C`` — :func:`clip_to_norm`, so any one device moves
   the sum by at most ``C`` whatever it sent;
2. the sum gets ``N(0, (z_Δ C)^2)`` noise on every coordinate and is divided by ``m``, not by
   the number of updates that arrived (that count is data-dependent) — :func:`dp_mean`;
3. adaptive clipping: the count of updates that were *not* clipped gets ``N(0, σ_b^2)`` noise,
   ``b̃ = noisy count / m``, and ``C ← C · exp(−η (b̃ − γ))`` — :func:`next_clip_norm`. Andrew et
   al. (Thm. 1) show the pair of releases is a Gaussian mechanism with noise multiplier
   ``z = (z_Δ^-2 + (2σ_b)^-2)^-1/2``; the accountant charges ``z`` and the update sum uses
   ``z_Δ = (z^-2 − (2σ_b)^-2)^-1/2`` (:func:`update_noise_multiplier`), as TF Federated does.

Each device contributes with weight 1: example counts are reported by the device and would
otherwise scale its influence past ``C``. :class:`CentralDP` holds the current clip norm, the
round's tally and the :class:`~broker_server.privacy.accountant.RdpAccountant`; randomness is an
injected ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_server.privacy.accountant import PrivacySpent, RdpAccountant, SampledGaussian, noise_multiplier_for
from broker_server.privacy.config import CentralDPConfig
from broker_server.privacy.errors import PrivacyError
from broker_server.privacy.rdp import DEFAULT_ORDERS
from edge_agent.errors import ConfigError, ContractViolation

__all__ = [
    "CentralDP",
    "RoundRelease",
    "clip_to_norm",
    "dp_mean",
    "next_clip_norm",
    "update_noise_multiplier",
    "update_norm",
]

Tensors = dict[str, np.ndarray]
_MARGIN = 1e-9


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors together (float64); ``ContractViolation`` for NaN/inf values."""
    squares = 0.0
    for name, value in update.items():
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise ContractViolation(f"update tensor {name!r} has non-finite values")
        squares += float(flat @ flat)
    return math.sqrt(squares)


def clip_to_norm(update: Mapping[str, np.ndarray], clip: float) -> tuple[Tensors, float, bool]:
    """``update · min(1, clip / |update|)`` as float64 copies, its norm before clipping, and whether
    it was scaled. The result's norm is at most ``clip`` (re-checked after rounding, with a 1e-9
    relative margin so the bound survives any summation order)."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be positive and finite, got {clip!r}")
    norm = update_norm(update)
    out = {name: np.array(value, dtype=np.float64) for name, value in update.items()}
    # a 1e-9 relative margin: the bound holds however the norm is summed (rounding order)
    target = clip * (1.0 - _MARGIN)
    if norm <= target:
        return out, norm, False
    factor = target / norm
    scaled = {name: value * factor for name, value in out.items()}
    while update_norm(scaled) > clip:  # float rounding can leave it a few ulps above
        factor = math.nextafter(factor, 0.0) * (1.0 - 2.0**-52)
        scaled = {name: value * factor for name, value in out.items()}
    return scaled, norm, True


def dp_mean(sums: Mapping[str, np.ndarray], *, stddev: float, denominator: float, rng: np.random.Generator) -> Tensors:
    """``(sums + N(0, stddev^2)) / denominator`` per coordinate, as float32 (the round's delta)."""
    if not (stddev >= 0 and math.isfinite(stddev)):
        raise ValueError(f"stddev must be finite and >= 0, got {stddev!r}")
    if not denominator > 0:
        raise ValueError(f"denominator must be positive, got {denominator!r}")
    out: Tensors = {}
    for name, value in sums.items():
        total = np.array(value, dtype=np.float64)
        total += rng.normal(0.0, stddev, size=total.shape)
        out[name] = (total / denominator).astype(np.float32)
    return out


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_Δ`` for the update sum when the unclipped count gets noise ``σ_b`` and the whole round
    must be a Gaussian mechanism of multiplier ``z`` (Andrew et al. 2021); needs ``2σ_b > z``."""
    rest = noise_multiplier**-2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"count_stddev {count_stddev} must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return float(rest**-0.5)


def next_clip_norm(clip: float, unclipped_fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """Geometric update ``C · exp(−η (b − γ))``: too many unclipped (b > γ) shrinks C, too few grows it."""
    return float(clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile)))


@dataclass(frozen=True)
class RoundRelease:
    """What one finalized round released, for logs and metrics."""

    clip_norm: float
    noise_stddev: float
    updates: int
    clipped: int
    #: the noisy unclipped fraction b̃ (adaptive clipping), else None
    unclipped_fraction: float | None
    next_clip_norm: float
    spent: PrivacySpent


class CentralDP:
    """The round engine's DP hooks: :meth:`clip` each accepted update, :meth:`finalize` the sum.

    Ask :meth:`budget_exhausted` before opening a round; :meth:`finalize` charges the round to
    the accountant *before* drawing any noise, so a round past the budget raises
    :class:`BudgetExhausted` and releases nothing.
    """

    def __init__(
        self, config: CentralDPConfig, *, rng: np.random.Generator, orders: Sequence[float] = DEFAULT_ORDERS
    ) -> None:
        self.config = config
        self._rng = rng
        if config.noise_multiplier is not None:
            z = config.noise_multiplier
        else:
            assert config.rounds is not None  # CentralDPConfig requires one of the two
            z = noise_multiplier_for(
                target_epsilon=config.epsilon,
                delta=config.delta,
                rounds=config.rounds,
                sampling_rate=config.sampling_rate,
                orders=orders,
            )
        #: the multiplier the accountant charges (the whole round's Gaussian mechanism)
        self.noise_multiplier = z
        #: the multiplier on the update sum (= z without adaptive clipping)
        self.update_noise_multiplier = z
        self.count_stddev: float | None = None
        if config.adaptive is not None:
            self.count_stddev = config.adaptive.stddev(config.clients_per_round)
            try:
                self.update_noise_multiplier = update_noise_multiplier(z, self.count_stddev)
            except ValueError as exc:
                raise ConfigError(f"privacy.adaptive.count_stddev: {exc}") from exc
        self.clip_norm = config.clip_norm
        self.accountant = RdpAccountant(
            SampledGaussian(sampling_rate=config.sampling_rate, noise_multiplier=z),
            epsilon_budget=config.epsilon,
            delta=config.delta,
            orders=orders,
        )
        self._updates = 0
        self._clipped = 0
        self.last_release: RoundRelease | None = None

    def budget_exhausted(self) -> bool:
        """True when one more round would pass the (ε, δ) budget: stop training."""
        return not self.accountant.can_run()

    def spent(self) -> PrivacySpent:
        return self.accountant.spent()

    def clip(self, update: Mapping[str, np.ndarray]) -> tuple[Tensors, bool]:
        """``update`` clipped to the round's C (float64 copies) and whether it was scaled.

        Counts the update into this round's tally, so call it once per *accepted* update.
        """
        clipped, _, was_clipped = clip_to_norm(update, self.clip_norm)
        self._updates += 1
        self._clipped += int(was_clipped)
        return clipped, was_clipped

    def finalize(self, sums: Mapping[str, np.ndarray], count: int) -> Tensors:
        """The round's noisy DP-FedAvg delta from the sum of :meth:`clip`-ed updates (weight 1 each).

        ``sums`` must hold every aggregated tensor (zeros when nothing arrived: an empty round
        still releases noise, and is charged). ``count`` must equal the updates clipped this round.
        """
        if count != self._updates:
            raise PrivacyError(f"finalize: count {count} differs from the {self._updates} updates clipped this round")
        self.accountant.record()  # raises BudgetExhausted before anything is drawn or released
        clip = self.clip_norm
        stddev = self.update_noise_multiplier * clip
        delta = dp_mean(sums, stddev=stddev, denominator=self.config.clients_per_round, rng=self._rng)
        fraction = None
        adaptive = self.config.adaptive
        if adaptive is not None and self.count_stddev is not None:
            unclipped = self._updates - self._clipped
            fraction = (unclipped + float(self._rng.normal(0.0, self.count_stddev))) / self.config.clients_per_round
            self.clip_norm = next_clip_norm(
                clip, fraction, target_quantile=adaptive.target_quantile, learning_rate=adaptive.learning_rate
            )
        self.last_release = RoundRelease(
            clip_norm=clip,
            noise_stddev=stddev,
            updates=self._updates,
            clipped=self._clipped,
            unclipped_fraction=fraction,
            next_clip_norm=self.clip_norm,
            spent=self.accountant.spent(),
        )
        self._updates = self._clipped = 0
        return delta

    def discard_round(self) -> None:
        """Forget this round's tally without charging it (the round was abandoned, nothing released)."""
        self._updates = self._clipped = 0

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: the current clip norm, the round's tally and the accountant's rounds."""
        return {
            "clip_norm": self.clip_norm,
            "updates": self._updates,
            "clipped": self._clipped,
            "accountant": self.accountant.snapshot(),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Continue from :meth:`snapshot` (same config); ``ValueError`` for a malformed one."""
        clip, updates, clipped = snapshot.get("clip_norm"), snapshot.get("updates"), snapshot.get("clipped")
        if not (isinstance(clip, int | float) and clip > 0 and math.isfinite(clip)):
            raise ValueError(f"bad clip_norm in DP snapshot: {clip!r}")
        if not (isinstance(updates, int) and isinstance(clipped, int) and 0 <= clipped <= updates):
            raise ValueError(f"bad round tally in DP snapshot: {updates!r} updates, {clipped!r} clipped")
        accountant = snapshot.get("accountant")
        if not isinstance(accountant, Mapping):
            raise ValueError("DP snapshot lacks the accountant's state")
        self.accountant.restore(accountant)
        self.clip_norm, self._updates, self._clipped = float(clip), updates, clipped

    def __repr__(self) -> str:
        spent = self.spent()
        return (
            f"CentralDP(C={self.clip_norm:.4g}, z={self.noise_multiplier:.4g}, q={self.config.sampling_rate:.4g}, "
            f"ε={spent.epsilon:.4g}/{self.config.epsilon} at δ={self.config.delta}, rounds={spent.rounds})"
        )
