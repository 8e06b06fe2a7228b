"""Central-DP settings as frozen dataclasses, parsed once from the server's ``privacy`` table.

::

    [privacy]
    clip_norm = 0.5              # C: every update is scaled to L2 norm <= C (initial C when adaptive)
    epsilon = 3.0                # the budget: training stops before ε would pass it
    delta = 1e-5
    clients_per_round = 10       # m: devices sent a TASK per round, and the mean's fixed denominator
    population = 50              # N: enrolled devices; sampling rate q = m / N
    noise_multiplier = 1.1       # z; omit it and give `rounds` to calibrate z so that `rounds` rounds spend ε
    rounds = 40
    [privacy.adaptive]           # optional: Andrew et al. 2021 adaptive clipping
    target_quantile = 0.5        # γ: the fraction of updates that should end up unclipped
    learning_rate = 0.2          # η: C ← C · exp(−η (b̃ − γ))
    count_stddev = 0.5           # σ_b: noise on the unclipped count (default m / 20)

Every error is a :class:`~edge_agent.errors.ConfigError` naming the key (``privacy.delta``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ConfigError

__all__ = ["AdaptiveClipping", "CentralDPConfig"]

_TOP_KEYS = frozenset(
    {"clip_norm", "epsilon", "delta", "clients_per_round", "population", "noise_multiplier", "rounds", "adaptive"}
)
_ADAPTIVE_KEYS = frozenset({"target_quantile", "learning_rate", "count_stddev"})


def _number(table: Mapping[str, Any], key: str, prefix: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{prefix}.{key} must be a finite number, got {value!r}")
    return float(value)


def _number_or(table: Mapping[str, Any], key: str, prefix: str, default: float) -> float:
    value = _number(table, key, prefix)
    return default if value is None else value


def _integer(table: Mapping[str, Any], key: str, prefix: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}.{key} must be an integer, got {value!r}")
    return value


def _unknown(table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})")


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """Geometric adaptive clipping toward a quantile of the update norms (Andrew et al. 2021)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    #: standard deviation of the noise on the count of unclipped updates; None = clients_per_round / 20
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.target_quantile < 1.0):
            raise ConfigError(f"privacy.adaptive.target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"privacy.adaptive.learning_rate must be positive, got {self.learning_rate!r}")
        if self.count_stddev is not None and not (self.count_stddev > 0 and math.isfinite(self.count_stddev)):
            raise ConfigError(f"privacy.adaptive.count_stddev must be positive, got {self.count_stddev!r}")

    def stddev(self, clients_per_round: int) -> float:
        return self.count_stddev if self.count_stddev is not None else clients_per_round / 20.0


@dataclass(frozen=True, kw_only=True)
class CentralDPConfig:
    """Central DP-FedAvg with an (ε, δ) budget. Exactly one way to get ``z``: ``noise_multiplier``
    itself, or ``rounds`` to calibrate it (the budget then lasts exactly about ``rounds`` rounds)."""

    clip_norm: float
    epsilon: float
    delta: float
    clients_per_round: int
    population: int
    noise_multiplier: float | None = None
    rounds: int | None = None
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"privacy.clip_norm must be positive, got {self.clip_norm!r}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"privacy.epsilon must be positive and finite, got {self.epsilon!r}")
        if not (0.0 < self.delta < 1.0):
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        if self.clients_per_round < 1:
            raise ConfigError(f"privacy.clients_per_round must be >= 1, got {self.clients_per_round!r}")
        if self.population < self.clients_per_round:
            raise ConfigError(
                f"privacy.population ({self.population}) must be >= clients_per_round ({self.clients_per_round})"
            )
        if self.noise_multiplier is None and self.rounds is None:
            raise ConfigError("privacy.noise_multiplier or privacy.rounds is required (to calibrate the noise)")
        z = self.noise_multiplier
        if z is not None and not (z > 0 and math.isfinite(z)):
            raise ConfigError(f"privacy.noise_multiplier must be positive, got {self.noise_multiplier!r}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"privacy.rounds must be >= 1, got {self.rounds!r}")

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.population

    @classmethod
    def parse(cls, table: Mapping[str, Any], *, prefix: str = "privacy") -> CentralDPConfig:
        """From the server config's ``privacy`` table; ``ConfigError`` naming any bad key."""
        _unknown(table, _TOP_KEYS, prefix)
        for key in ("clip_norm", "epsilon", "delta", "clients_per_round", "population"):
            if key not in table:
                raise ConfigError(f"{prefix}.{key} is required")
        adaptive_table = table.get("adaptive")
        adaptive = None
        if adaptive_table is not None:
            if not isinstance(adaptive_table, Mapping):
                raise ConfigError(f"{prefix}.adaptive must be a table, got {adaptive_table!r}")
            _unknown(adaptive_table, _ADAPTIVE_KEYS, f"{prefix}.adaptive")
            adaptive = AdaptiveClipping(
                target_quantile=_number_or(adaptive_table, "target_quantile", f"{prefix}.adaptive", 0.5),
                learning_rate=_number_or(adaptive_table, "learning_rate", f"{prefix}.adaptive", 0.2),
                count_stddev=_number(adaptive_table, "count_stddev", f"{prefix}.adaptive"),
            )
        return cls(
            clip_norm=_number_or(table, "clip_norm", prefix, 0.0),
            epsilon=_number_or(table, "epsilon", prefix, 0.0),
            delta=_number_or(table, "delta", prefix, 0.0),
            clients_per_round=_integer(table, "clients_per_round", prefix) or 0,
            population=_integer(table, "population", prefix) or 0,
            noise_multiplier=_number(table, "noise_multiplier", prefix),
            rounds=_integer(table, "rounds", prefix),
            adaptive=adaptive,
        )
