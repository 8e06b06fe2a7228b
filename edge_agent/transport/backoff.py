"""Reconnect backoff of the MQTT transport: pure delay functions and the ``[mqtt]`` reconnect keys.

A fleet that loses its broker must not come back in lockstep: every device would hit the
restarted broker in the same instant (paho's own ``reconnect_delay_set`` doubles the delay
without any randomness). Three modes, chosen by :attr:`MqttConfig.reconnect_jitter_mode`:

* ``"full"`` (the default): "full jitter" (AWS Architecture Blog, *Exponential Backoff And
  Jitter*): attempt ``n`` waits ``uniform(0, min(max, min · 2^n))``. Reconnects after an outage
  spread evenly over the current window, which doubles while the broker stays away.
* ``"added"``: the capped doubling plus ``uniform(0, jitter · base)`` on top
  (:func:`reconnect_delay`; never shorter than the base, spread by ``jitter``).
* ``"none"``: plain capped doubling, what paho does by itself: the lockstep baseline the
  reconnect-storm drill (``benchmarks/fleet.py``) measures against.

``[mqtt]`` keys (:func:`parse_reconnect_table`)::

    [mqtt]
    reconnect_min_s = 1.0        # first window (full) or first delay (added, none)
    reconnect_max_s = 60.0       # the cap of the doubling
    reconnect_jitter = "full"    # "full" | "added" | "none"
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.errors import ConfigError

__all__ = [
    "JITTER_MODES",
    "RECONNECT_KEYS",
    "Backoff",
    "ReconnectSettings",
    "backoff_delay",
    "full_jitter_delay",
    "parse_reconnect_table",
    "reconnect_delay",
    "validate_reconnect",
]

JITTER_FULL = "full"
JITTER_ADDED = "added"
JITTER_NONE = "none"
JITTER_MODES = (JITTER_FULL, JITTER_ADDED, JITTER_NONE)
#: the reconnect keys of an ``[mqtt]`` table
RECONNECT_KEYS = ("reconnect_min_s", "reconnect_max_s", "reconnect_jitter")


def _capped(attempt: int, min_delay: float, max_delay: float) -> float:
    return min(max_delay, min_delay * 2.0 ** min(max(attempt, 0), 62))


def reconnect_delay(attempt: int, *, min_delay: float, max_delay: float, jitter: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): capped doubling plus random jitter.

    The jitter is added on top of the cap so that devices which all hit ``max_delay`` still
    spread out instead of hammering a recovering broker at the same instant.
    """
    base = _capped(attempt, min_delay, max_delay)
    return base + rng.uniform(0.0, jitter * base)


def full_jitter_delay(attempt: int, *, min_delay: float, max_delay: float, rng: random.Random) -> float:
    """``uniform(0, min(max_delay, min_delay · 2^attempt))``: "full jitter" exponential backoff."""
    return rng.uniform(0.0, _capped(attempt, min_delay, max_delay))


def backoff_delay(
    mode: str, attempt: int, *, min_delay: float, max_delay: float, jitter: float, rng: random.Random
) -> float:
    """The delay of ``mode`` (one of :data:`JITTER_MODES`) before attempt ``attempt``."""
    if mode == JITTER_FULL:
        return full_jitter_delay(attempt, min_delay=min_delay, max_delay=max_delay, rng=rng)
    if mode == JITTER_ADDED:
        return reconnect_delay(attempt, min_delay=min_delay, max_delay=max_delay, jitter=jitter, rng=rng)
    if mode == JITTER_NONE:
        return _capped(attempt, min_delay, max_delay)
    raise ConfigError(f"reconnect jitter mode must be one of {', '.join(map(repr, JITTER_MODES))}, not {mode!r}")


class _BackoffConfig(Protocol):
    @property
    def reconnect_min_delay(self) -> float: ...
    @property
    def reconnect_max_delay(self) -> float: ...
    @property
    def reconnect_jitter(self) -> float: ...
    @property
    def reconnect_jitter_mode(self) -> str: ...


class Backoff:
    """The reconnect delays of one transport: :func:`backoff_delay` with its attempt counter."""

    def __init__(self, config: _BackoffConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        cfg = self._config
        delay = backoff_delay(
            cfg.reconnect_jitter_mode,
            self.attempt,
            min_delay=cfg.reconnect_min_delay,
            max_delay=cfg.reconnect_max_delay,
            jitter=cfg.reconnect_jitter,
            rng=self._rng,
        )
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """After a successful connect the next outage starts from the shortest window again."""
        self.attempt = 0


def validate_reconnect(min_delay: float, max_delay: float, jitter: float, mode: str) -> None:
    """:class:`ConfigError` unless ``0 < min <= max``, ``jitter >= 0`` and ``mode`` is known."""
    numbers = (min_delay, max_delay, jitter)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ConfigError(f"reconnect delays and jitter must be finite numbers, got {numbers!r}")
    if not 0 < min_delay <= max_delay or jitter < 0:
        raise ConfigError("need 0 < reconnect_min_delay <= reconnect_max_delay and reconnect_jitter >= 0")
    if mode not in JITTER_MODES:
        raise ConfigError(f"reconnect jitter mode must be one of {', '.join(map(repr, JITTER_MODES))}, not {mode!r}")


@dataclass(frozen=True, kw_only=True)
class ReconnectSettings:
    """The reconnect keys of an ``[mqtt]`` table, validated; :meth:`config_fields` feeds ``MqttConfig``."""

    min_s: float = 1.0
    max_s: float = 60.0
    jitter: str = JITTER_FULL

    def __post_init__(self) -> None:
        validate_reconnect(self.min_s, self.max_s, 1.0, self.jitter)

    def config_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~edge_agent.transport.mqtt_config.MqttConfig`."""
        return {
            "reconnect_min_delay": float(self.min_s),
            "reconnect_max_delay": float(self.max_s),
            "reconnect_jitter_mode": self.jitter,
        }


def parse_reconnect_table(table: Mapping[str, Any], prefix: str = "mqtt.") -> ReconnectSettings:
    """The ``reconnect_*`` keys of ``table`` (others are ignored: the caller checks unknown keys).

    Every problem is a :class:`ConfigError` naming the key (``mqtt.reconnect_max_s: ...``).
    """
    values: dict[str, Any] = {}
    for key, field_name in (("reconnect_min_s", "min_s"), ("reconnect_max_s", "max_s")):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{prefix}{key}: expected a positive number of seconds, got {value!r}")
            values[field_name] = float(value)
    if "reconnect_jitter" in table:
        mode = table["reconnect_jitter"]
        if mode not in JITTER_MODES:
            raise ConfigError(f"{prefix}reconnect_jitter: expected one of {list(JITTER_MODES)}, got {mode!r}")
        values["jitter"] = mode
    settings = ReconnectSettings()
    min_s, max_s = values.get("min_s", settings.min_s), values.get("max_s", settings.max_s)
    if min_s > max_s:
        raise ConfigError(f"{prefix}reconnect_min_s ({min_s:g}) must not exceed {prefix}reconnect_max_s ({max_s:g})")
    return ReconnectSettings(**values)
