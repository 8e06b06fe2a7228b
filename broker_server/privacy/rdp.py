"""Rényi-DP math for the Poisson-subsampled Gaussian mechanism: pure numpy/scipy, no state.

A round of central DP-FedAvg is one *sampled Gaussian mechanism* (SGM): every device joins the
round independently with probability ``q``, the clipped updates (L2 norm <= C) are summed and
``N(0, (z C)^2)`` noise is added to every coordinate; ``z`` is the noise multiplier.

* :func:`rdp_sampled_gaussian` — the SGM's RDP ``ε_α`` at each order α (Mironov, Talwar, Zhang
  2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", §3.3): ``ε_α = log(A_α) /
  (α − 1)`` with ``A_α = E_{x~N(0,z²)}[((1−q) + q·exp((2x−1)/(2z²)))^α]``, computed by the exact
  binomial sum for integer α and by the paper's convergent two-sided series for fractional α.
  The neighbouring relation is add/remove one device (Poisson sampling).
* :func:`epsilon_from_rdp` — RDP → (ε, δ) with the improved conversion of Balle, Barthe, Gaboardi,
  Hsu, Sato 2020 (Theorem 21), the same bound as Canonne, Kamath, Steinke 2020 (Proposition 12)
  and what Opacus's ``get_privacy_spent`` and Google's ``dp_accounting`` ``compute_epsilon`` use:
  ``ε = min_α  ε_α + log((α−1)/α) − (log δ + log α)/(α − 1)``.

Composition over rounds is addition of the RDP vectors (Mironov 2017, Proposition 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

__all__ = ["DEFAULT_ORDERS", "epsilon_from_rdp", "log_a", "rdp_sampled_gaussian"]

#: TF-Privacy's / Opacus's dense grid (1.1 … 10.9 in steps of 0.1, then 11 … 63) plus 64, 128, 256
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [64.0, 128.0, 256.0]
)

#: a series term below exp(-30) of the sum no longer matters (both halves of A_α are >= ~1)
_NEGLIGIBLE_LOG = -30.0
_CHUNK = 256
_MAX_TERMS = 1 << 20


def _check_mechanism(q: float, z: float) -> None:
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"sampling rate must be in [0, 1], got {q!r}")
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {z!r}")


def _log_binom(alpha: float, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log|C(α, k)|`` and its sign for real α and integer ``k >= 0`` (generalised binomial)."""
    tail = alpha - k + 1.0
    logs = special.gammaln(alpha + 1.0) - special.gammaln(k + 1.0) - special.gammaln(tail)
    return logs, special.gammasgn(tail)


def _log_a_integer(q: float, z: float, alpha: int) -> float:
    """Exact: ``A_α = Σ_k C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2z²))``."""
    k = np.arange(alpha + 1, dtype=np.float64)
    logs, _ = _log_binom(float(alpha), k)
    terms = logs + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2.0 * z * z)
    return float(special.logsumexp(terms))


def _log_a_fractional(q: float, z: float, alpha: float) -> float:
    """Mironov et al. 2019 §3.3: split the integral at ``z0`` and expand both halves as series."""
    z0 = z * z * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1q = math.log(q), math.log1p(-q)
    logs: list[np.ndarray] = []
    signs: list[np.ndarray] = []
    start = 0
    while True:
        i = np.arange(start, start + _CHUNK, dtype=np.float64)
        j = alpha - i
        log_coef, sign = _log_binom(alpha, i)
        # half below z0: the i-th term of ((1-q) + q e^{...})^α expanded in powers of q e^{...}
        s0 = log_coef + i * log_q + j * log_1q + (i * i - i) / (2 * z * z) + special.log_ndtr((z0 - i) / z)
        # half above z0: expanded the other way round
        s1 = log_coef + j * log_q + i * log_1q + (j * j - j) / (2 * z * z) + special.log_ndtr((j - z0) / z)
        logs.extend((s0, s1))
        signs.extend((sign, sign))
        start += _CHUNK
        if max(float(s0[-1]), float(s1[-1])) < _NEGLIGIBLE_LOG and start > alpha:
            break
        if start >= _MAX_TERMS:
            raise ArithmeticError(f"RDP series did not converge (q={q}, z={z}, order={alpha})")
    value, total_sign = special.logsumexp(np.concatenate(logs), b=np.concatenate(signs), return_sign=True)
    if total_sign <= 0:
        raise ArithmeticError(f"RDP series lost precision (q={q}, z={z}, order={alpha})")
    return float(value)


def log_a(q: float, z: float, alpha: float) -> float:
    """``log A_α`` of the sampled Gaussian mechanism for ``0 < q < 1``, ``z > 0``, ``α > 1``."""
    if float(alpha).is_integer():
        return _log_a_integer(q, z, int(alpha))
    return _log_a_fractional(q, z, alpha)


def _rdp_one(q: float, z: float, alpha: float) -> float:
    if q == 0.0:
        return 0.0
    if z == 0.0 or math.isinf(alpha):
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * z * z)
    # log A_α >= 0 mathematically; rounding can make it -1e-17
    return max(0.0, log_a(q, z, alpha)) / (alpha - 1.0)


def rdp_sampled_gaussian(q: float, z: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP ``ε_α`` of ONE round of the sampled Gaussian mechanism at each order (add/remove one).

    ``q`` is the probability that a given device takes part in the round, ``z`` the noise standard
    deviation divided by the L2 sensitivity (the clip norm). Rounds compose by addition.
    """
    _check_mechanism(q, z)
    if any(not (a > 1.0) for a in orders):
        raise ValueError(f"RDP orders must be > 1, got {list(orders)}")
    return np.array([_rdp_one(q, z, float(a)) for a in orders], dtype=np.float64)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float) -> tuple[float, float]:
    """Smallest ε over the orders for which the RDP curve ``rdp`` gives (ε, δ)-DP, and its order.

    Balle et al. 2020 Theorem 21 (= Canonne-Kamath-Steinke 2020 Proposition 12). An order whose
    RDP is infinite gives ε = inf; if every order does, the result is ``(inf, nan)``.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"orders and rdp must be equally long non-empty vectors, got {a.shape} and {r.shape}")
    if np.any(a <= 1.0) or np.any(np.isnan(r)) or np.any(r < 0):
        raise ValueError("orders must be > 1 and RDP values >= 0")
    with np.errstate(invalid="ignore", over="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    if not np.any(np.isfinite(eps)):
        return math.inf, math.nan
    best = int(np.nanargmin(np.where(np.isfinite(eps), eps, np.inf)))
    return max(0.0, float(eps[best])), float(a[best])
