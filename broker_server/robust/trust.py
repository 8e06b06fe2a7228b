"""Tiered trust: a reputation per device, learned from its updates, that weights and quarantines.

Each round the server reports an :class:`Observation` per participating device: the distance and
cosine similarity of its update to the round's (robust) aggregate, and optionally a validation
result in [0, 1] (1 = the update passed the server's check). :meth:`Reputation.update` then

* flags the round as an *outlier* for a device whose distance is more than ``outlier_sigma``
  robust standard deviations above the round median, whose cosine is below ``min_cosine``, or
  whose validation is below ``min_validation``;
* moves the device's score (an exponential moving average, ``alpha`` for the newest round) toward
  0 for an outlier round and toward its validation result (1 without one) otherwise;
* quarantines a device after ``quarantine_after`` outlier rounds in a row, or when its score falls
  below ``quarantine_below``; a quarantined device's multiplier is 0;
* releases it after ``probation_rounds * strikes`` consecutive rounds (by round number) without an
  outlier observation — a repeat offender waits longer each time — with ``release_score``.

Why a robust, floored sigma: distances of high-dimensional updates concentrate, so the median
absolute deviation across honest devices can be tiny and would flag a device that is merely more
non-IID than the rest. The sigma used is ``max(1.4826 * MAD, min_spread * median)``: with the
defaults a device must be more than 2.5x the median distance away to count as an outlier.

Everything is pure: the caller persists :meth:`Reputation.to_state` (plain JSON types) and logs
the returned :class:`TrustDecision` reasons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from broker_server.robust.clip import UpdateStats
from broker_server.robust.core import DEFAULT_WORK_BYTES, check_rows, column_blocks

STATE_VERSION = 1
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation

Action = Literal["outlier", "quarantine", "extend", "release"]


@dataclass(frozen=True, kw_only=True)
class TrustConfig:
    alpha: float = 0.3
    #: a new device starts here (below 1: trust is earned; limits what fresh Sybils can weigh)
    initial_score: float = 0.5
    outlier_sigma: float = 3.0
    min_spread: float = 0.5
    min_cosine: float = 0.0
    min_validation: float = 0.5
    #: the distance test needs at least this many devices in the round (else only cosine/validation)
    min_round_size: int = 5
    quarantine_after: int = 3
    quarantine_below: float = 0.2
    probation_rounds: int = 5
    release_score: float = 0.3

    def __post_init__(self) -> None:
        for name in ("alpha", "initial_score", "min_validation", "quarantine_below", "release_score"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not self.alpha > 0:
            raise ValueError("alpha must be > 0")
        if not (self.outlier_sigma > 0 and self.min_spread >= 0 and -1.0 <= self.min_cosine <= 1.0):
            raise ValueError("outlier_sigma must be > 0, min_spread >= 0, min_cosine in [-1, 1]")
        for name in ("min_round_size", "quarantine_after", "probation_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.quarantine_below < min(self.initial_score, self.release_score):
            raise ValueError("quarantine_below must be below initial_score and release_score")


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One device's update in one round, as the server measured it."""

    distance: float | None = None
    cosine: float | None = None
    validation: float | None = None

    def __post_init__(self) -> None:
        for name, low, high in (("distance", 0.0, math.inf), ("cosine", -1.0, 1.0), ("validation", 0.0, 1.0)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and low <= value <= high):
                raise ValueError(f"{name} must be None or a number in [{low}, {high}], got {value!r}")
            if value is not None and math.isinf(value):
                raise ValueError(f"{name} must be finite, got {value!r}")

    @classmethod
    def from_stats(cls, stats: UpdateStats, *, validation: float | None = None) -> Observation:
        """From streaming clipping stats measured against a reference (e.g. last round's aggregate)."""
        return cls(distance=stats.distance, cosine=stats.cosine, validation=validation)


@dataclass(frozen=True, kw_only=True)
class TrustDecision:
    device_id: str
    round: int
    action: Action
    reason: str
    score: float


@dataclass(frozen=True, kw_only=True)
class TrustStatus:
    score: float
    multiplier: float
    quarantined: bool
    reason: str
    strikes: int
    streak: int


@dataclass
class _Device:
    score: float
    streak: int = 0
    quarantined_at: int | None = None
    clean_since: int | None = None
    strikes: int = 0
    reason: str = ""
    observed: int = 0


def observe_rows(
    rows: np.ndarray,
    aggregate: np.ndarray,
    device_ids: Sequence[str],
    *,
    row_scale: np.ndarray | None = None,
    validations: Mapping[str, float] | None = None,
    work_bytes: int = DEFAULT_WORK_BYTES,
) -> dict[str, Observation]:
    """Distance and cosine of every row to ``aggregate`` (column blocks, float64)."""
    n, d, _ = check_rows(rows, None, row_scale)
    if aggregate.shape != (d,) or len(device_ids) != n:
        raise ValueError(f"aggregate must have shape ({d},) and device_ids {n} entries")
    squares = np.zeros(n)
    dots = np.zeros(n)
    ref_squares = 0.0
    for columns, block in column_blocks(rows, row_scale, work_bytes, temporaries=3):
        ref = aggregate[columns].astype(np.float64)
        squares += np.einsum("ij,ij->i", block, block)
        dots += block @ ref
        ref_squares += float(ref @ ref)
    ref_norm = math.sqrt(ref_squares)
    out: dict[str, Observation] = {}
    for i, device_id in enumerate(device_ids):
        norm = math.sqrt(squares[i])
        cosine = float(dots[i]) / (norm * ref_norm) if norm > 0 and ref_norm > 0 else 0.0
        out[device_id] = Observation(
            distance=math.sqrt(max(0.0, squares[i] - 2.0 * dots[i] + ref_squares)),
            cosine=max(-1.0, min(1.0, cosine)),
            validation=None if validations is None else validations.get(device_id),
        )
    return out


class Reputation:
    """Per-device trust scores, quarantine and probation (see the module docstring)."""

    def __init__(self, config: TrustConfig | None = None) -> None:
        self.config = config if config is not None else TrustConfig()
        self._devices: dict[str, _Device] = {}
        self.last_round: int | None = None

    def multiplier(self, device_id: str) -> float:
        """Weight multiplier in [0, 1] for folding this device's next update (0 = quarantined)."""
        device = self._devices.get(device_id)
        if device is None:
            return self.config.initial_score
        return 0.0 if device.quarantined_at is not None else min(1.0, max(0.0, device.score))

    def is_quarantined(self, device_id: str) -> bool:
        device = self._devices.get(device_id)
        return device is not None and device.quarantined_at is not None

    @property
    def quarantined(self) -> tuple[str, ...]:
        return tuple(sorted(i for i, d in self._devices.items() if d.quarantined_at is not None))

    def status(self, device_id: str) -> TrustStatus:
        device = self._devices.get(device_id) or _Device(score=self.config.initial_score)
        return TrustStatus(
            score=device.score,
            multiplier=self.multiplier(device_id),
            quarantined=device.quarantined_at is not None,
            reason=device.reason,
            strikes=device.strikes,
            streak=device.streak,
        )

    def _distance_sigmas(self, observations: Mapping[str, Observation]) -> dict[str, float]:
        measured = {i: o.distance for i, o in observations.items() if o.distance is not None}
        if len(measured) < self.config.min_round_size:
            return {}
        values = np.array(list(measured.values()), dtype=np.float64)
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        sigma = max(MAD_TO_SIGMA * mad, self.config.min_spread * median, 1e-12)
        return {i: (value - median) / sigma for i, value in measured.items()}

    def _flags(self, observation: Observation, sigmas: float | None) -> list[str]:
        cfg = self.config
        flags = []
        if sigmas is not None and sigmas > cfg.outlier_sigma:
            flags.append(f"distance to aggregate {sigmas:.1f}σ above the round median")
        if observation.cosine is not None and observation.cosine < cfg.min_cosine:
            flags.append(f"cosine to aggregate {observation.cosine:.2f} below {cfg.min_cosine:.2f}")
        if observation.validation is not None and observation.validation < cfg.min_validation:
            flags.append(f"validation {observation.validation:.2f} below {cfg.min_validation:.2f}")
        return flags

    def update(self, round_number: int, observations: Mapping[str, Observation]) -> list[TrustDecision]:
        """Fold one finished round in; returns every decision taken (log them)."""
        if self.last_round is not None and round_number <= self.last_round:
            raise ValueError(f"round {round_number} is not after the last round seen ({self.last_round})")
        cfg = self.config
        sigmas = self._distance_sigmas(observations)
        decisions: list[TrustDecision] = []

        def decide(device_id: str, action: Action, reason: str) -> None:
            score = self._devices[device_id].score
            decisions.append(
                TrustDecision(device_id=device_id, round=round_number, action=action, reason=reason, score=score)
            )

        for device_id in sorted(observations):
            observation = observations[device_id]
            device = self._devices.setdefault(device_id, _Device(score=cfg.initial_score))
            device.observed += 1
            flags = self._flags(observation, sigmas.get(device_id))
            what = "; ".join(flags)
            if device.quarantined_at is not None:
                if flags:
                    device.clean_since = round_number
                    decide(device_id, "extend", f"quarantine extended: {what}")
                continue
            quality = 0.0 if flags else min(1.0, 1.0 if observation.validation is None else observation.validation)
            device.score = (1.0 - cfg.alpha) * device.score + cfg.alpha * quality
            device.streak = device.streak + 1 if flags else 0
            if flags and device.streak >= cfg.quarantine_after:
                self._quarantine(device, round_number, f"quarantined: {what} {device.streak} rounds in a row")
                decide(device_id, "quarantine", device.reason)
            elif device.score < cfg.quarantine_below:
                last = what or f"validation {observation.validation:.2f}"
                reason = f"quarantined: trust score {device.score:.2f} below {cfg.quarantine_below:.2f} ({last})"
                self._quarantine(device, round_number, reason)
                decide(device_id, "quarantine", reason)
            elif flags:
                decide(device_id, "outlier", f"outlier round {device.streak} of {cfg.quarantine_after}: {what}")
        for device_id, device in sorted(self._devices.items()):
            if device.quarantined_at is None or device.quarantined_at == round_number or device.clean_since is None:
                continue
            clean = round_number - device.clean_since
            if clean >= cfg.probation_rounds * device.strikes:
                reason = f"released: {clean} rounds without an outlier since {device.reason!r}"
                device.quarantined_at = device.clean_since = None
                device.score, device.streak, device.reason = cfg.release_score, 0, reason
                decide(device_id, "release", reason)
        self.last_round = round_number
        return decisions

    @staticmethod
    def _quarantine(device: _Device, round_number: int, reason: str) -> None:
        device.quarantined_at = device.clean_since = round_number
        device.strikes += 1
        device.streak = 0
        device.reason = reason

    def to_state(self) -> dict[str, Any]:
        """Plain JSON types (the config is not included: it comes from the server's configuration)."""
        return {
            "version": STATE_VERSION,
            "last_round": self.last_round,
            "devices": {device_id: asdict(device) for device_id, device in sorted(self._devices.items())},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: TrustConfig | None = None) -> Reputation:
        """Inverse of :meth:`to_state`; ``ValueError`` for a state this code cannot read."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reputation state version {state.get('version')!r} (this code reads {STATE_VERSION})")
        reputation = cls(config)
        last_round = state.get("last_round")
        if last_round is not None and not isinstance(last_round, int):
            raise ValueError(f"last_round must be an int or null, got {last_round!r}")
        reputation.last_round = last_round
        devices = state.get("devices")
        if not isinstance(devices, Mapping):
            raise ValueError("reputation state lacks its devices")
        fields = set(_Device.__dataclass_fields__)
        for device_id, entry in devices.items():
            if not isinstance(entry, Mapping) or set(entry) != fields:
                raise ValueError(f"device {device_id!r}: expected fields {sorted(fields)}")
            device = _Device(**entry)
            if not (isinstance(device.score, (int, float)) and 0.0 <= device.score <= 1.0):
                raise ValueError(f"device {device_id!r}: score {device.score!r} not in [0, 1]")
            reputation._devices[str(device_id)] = device
        return reputation
