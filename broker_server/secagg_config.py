"""The ``[secagg]`` table: secure aggregation of every round's updates (docs/secagg.md, "Over MQTT").

Keys (all optional; a present table turns secure aggregation on unless ``enabled = false``)::

    enabled            true
    threshold          t as a number of devices (at most the round's cohort), or
    threshold_fraction t = max(2, ceil(fraction * cohort)), in (0, 1]; neither: floor(2n/3) + 1
    clip               0.1   the cohort-wide clip c of the (example-weighted) update coordinates
    quant_bits         8     code bits b (2..24); the ring bits follow from the cohort
    keys_timeout_s     30    phase deadlines, from the phase's start: keys are advertised when the
    shares_timeout_s   30    TASK arrives, shares when the key list does; the masked inputs are
    unmask_timeout_s   30    due by the round's deadline (they follow training)

Refused combinations (:func:`secagg_conflicts`), each a :class:`ConfigError` naming the key: the
server sees only the sum, so nothing that needs one device's update can run — a ``robust`` rule
(clipping or ranking single updates), ``trust`` (observes each update against the aggregate),
``clusters`` (CFL splits on single updates' similarity), ``late_updates = "async"`` (a straggler's
update would have to arrive unmasked, outside its session), central DP ``privacy`` (it clips every
update on the server; the device-side clipping distributed DP needs is not built). Personal
tensors are not a conflict: they never leave their devices and are not part of the aggregated vector.

With ``mode = "async"`` every FedBuff buffer is one session (:mod:`broker_server.secagg_buffers`):
its cohort is :func:`buffer_cohort` devices, ``ceil(over_selection × buffer_size)``, all tasked at
once on one model version; the threshold is taken for that cohort, and ``asynchronous.concurrency``
must hold at least one cohort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ConfigError
from edge_agent.secagg.params import default_threshold
from edge_agent.secagg.ring import MAX_QUANT_BITS, MIN_QUANT_BITS

if TYPE_CHECKING:
    from broker_server.server_config import ServerConfig

__all__ = ["SecAggSettings", "buffer_cohort", "parse_secagg", "secagg_conflicts"]

_KEYS = frozenset(
    {
        "enabled",
        "threshold",
        "threshold_fraction",
        "clip",
        "quant_bits",
        "keys_timeout_s",
        "shares_timeout_s",
        "unmask_timeout_s",
    }
)


@dataclass(frozen=True, kw_only=True)
class SecAggSettings:
    threshold: int | None = None
    threshold_fraction: float | None = None
    clip: float = 0.1
    quant_bits: int = 8
    keys_timeout_s: float = 30.0
    shares_timeout_s: float = 30.0
    unmask_timeout_s: float = 30.0

    def threshold_for(self, cohort: int) -> int:
        """``t`` for a cohort of ``cohort`` devices (may exceed it: the round is then skipped)."""
        if self.threshold is not None:
            return self.threshold
        if self.threshold_fraction is not None:
            return max(2, math.ceil(self.threshold_fraction * cohort - 1e-9))
        return default_threshold(cohort)


def _number(table: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> Any:
    value = table.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"secagg.{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def parse_secagg(table: Mapping[str, Any] | None) -> SecAggSettings | None:
    """The parsed table; None when absent or ``enabled = false``. ConfigError names the bad key."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"secagg must be a table, got {table!r}")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"secagg.{unknown[0]} is not a secagg key (keys: {', '.join(sorted(_KEYS))})")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"secagg.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    if "threshold" in table and "threshold_fraction" in table:
        raise ConfigError("secagg.threshold_fraction: give threshold or threshold_fraction, not both")
    threshold = _number(table, "threshold", 2, integer=True) if "threshold" in table else None
    if threshold is not None and threshold < 2:
        raise ConfigError(f"secagg.threshold must be >= 2, got {threshold}")
    fraction = _number(table, "threshold_fraction", 1.0) if "threshold_fraction" in table else None
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"secagg.threshold_fraction must be in (0, 1], got {fraction}")
    clip = float(_number(table, "clip", 0.1))
    if clip <= 0:
        raise ConfigError(f"secagg.clip must be > 0, got {clip}")
    bits = _number(table, "quant_bits", 8, integer=True)
    if not MIN_QUANT_BITS <= bits <= MAX_QUANT_BITS:
        raise ConfigError(f"secagg.quant_bits must be in {MIN_QUANT_BITS}..{MAX_QUANT_BITS}, got {bits}")
    timeouts = {}
    for key in ("keys_timeout_s", "shares_timeout_s", "unmask_timeout_s"):
        timeouts[key] = float(_number(table, key, 30.0))
        if timeouts[key] <= 0:
            raise ConfigError(f"secagg.{key} must be > 0, got {timeouts[key]}")
    return SecAggSettings(threshold=threshold, threshold_fraction=fraction, clip=clip, quant_bits=bits, **timeouts)


def secagg_conflicts(config: ServerConfig) -> list[tuple[str, str]]:
    """``(key, why)`` for every setting that cannot work with masked updates (module docstring)."""
    found = []
    if config.late_updates != "drop":
        found.append(("late_updates", "'async' (a straggler's update would arrive outside its session)"))
    if config.robust:
        found.append(("robust", "a robust rule (it needs each device's update; the server sees only the sum)"))
    if config.trust is not None:
        found.append(("trust", "tiered trust (it observes each device's update against the aggregate)"))
    if config.clusters is not None:
        found.append(("clusters", "clustered FL (it splits clusters on single updates' similarity)"))
    if config.privacy is not None:
        found.append(("privacy", "central DP (it clips every update on the server; device-side clipping is not built)"))
    return found


def check_secagg(config: ServerConfig) -> SecAggSettings | None:
    """The parsed ``secagg`` table of ``config``, or ConfigError naming what cannot combine with it."""
    settings = parse_secagg(config.secagg)
    if settings is None:
        return None
    for key, why in secagg_conflicts(config):
        raise ConfigError(f"{key}: {why} cannot be combined with secure aggregation (secagg table); docs/secagg.md")
    if config.mode == "async":
        _check_buffers(config, settings)
        return settings
    if settings.threshold is not None and settings.threshold > config.clients_per_round:
        raise ConfigError(
            f"secagg.threshold ({settings.threshold}) exceeds clients_per_round ({config.clients_per_round})"
        )
    if config.clients_per_round < 2:
        raise ConfigError("clients_per_round: secure aggregation needs a cohort of at least 2 devices")
    return settings


def buffer_cohort(buffer_size: int, over_selection: float) -> int:
    """The devices tasked for one FedBuff buffer's session: ``ceil(over_selection × buffer_size)``."""
    return max(buffer_size, math.ceil(over_selection * buffer_size - 1e-9))


def _check_buffers(config: ServerConfig, settings: SecAggSettings) -> None:
    fedbuff = config.fedbuff_settings()
    cohort = buffer_cohort(fedbuff.buffer_size, config.over_selection)
    if cohort < 2:
        raise ConfigError(
            f"asynchronous.buffer_size: secure aggregation needs a cohort of at least 2 devices, got {cohort}"
        )
    if settings.threshold is not None and settings.threshold > cohort:
        raise ConfigError(f"secagg.threshold ({settings.threshold}) exceeds a buffer's cohort ({cohort} devices)")
    if fedbuff.concurrency < cohort:
        raise ConfigError(
            f"asynchronous.concurrency ({fedbuff.concurrency}) is below a buffer's cohort ({cohort} devices): "
            "all of a buffer's tasks go out at once"
        )
