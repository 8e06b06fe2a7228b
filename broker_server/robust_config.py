"""The server's ``robust`` and ``trust`` tables, parsed once into typed settings.

``ServerConfig.robust`` chooses how a round's updates are combined:

==================  =========================================================================
``{}``              streaming FedAvg (O(model) memory), as without this module
``rule: clip``      streaming FedAvg with every update clipped to L2 norm ``clip`` (O(model))
``rule: median``    coordinate-wise median over an :class:`UpdateBuffer` of the round's updates
``rule: trimmed_mean``  per coordinate, drop ``floor(beta × n)`` values at each end (``beta`` 0.1)
``rule: krum``      Multi-Krum tolerating ``f`` attackers (required), averaging the ``m`` best (1)
==================  =========================================================================

The buffered rules (median, trimmed mean, Krum) also take ``max_buffer_mb`` (512: the buffer's
hard cap, which caps the tasks a round sends), ``dtype`` (``float32`` or ``float16`` storage)
and ``weighted`` (use the example-count x trust weights; off by default because a device
reports its own example count). A key the rule does not use is a :class:`ConfigError` naming it.

``ServerConfig.trust`` is ``None`` (off) or a table of :class:`TrustConfig` fields (``{}``: the
defaults).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from broker_server.robust import BufferConfig, Krum, Median, RowRule, TrimmedMean, TrustConfig
from edge_agent.errors import ConfigError

__all__ = ["RULES", "RobustSettings", "parse_trust"]

RuleName = Literal["median", "trimmed_mean", "krum", "clip"]
RULES: tuple[RuleName, ...] = ("median", "trimmed_mean", "krum", "clip")

_BUFFER_KEYS = frozenset({"max_buffer_mb", "dtype", "weighted"})
#: the keys each rule accepts besides ``rule``
_KEYS: dict[str, frozenset[str]] = {
    "median": _BUFFER_KEYS,
    "trimmed_mean": _BUFFER_KEYS | {"beta"},
    "krum": _BUFFER_KEYS | {"f", "m"},
    "clip": frozenset({"clip"}),
}
_REQUIRED = {"krum": "f", "clip": "clip"}


@dataclass(frozen=True, kw_only=True)
class RobustSettings:
    """A parsed ``robust`` table (build it with :meth:`parse`)."""

    rule: RuleName
    beta: float = 0.1
    f: int = 0
    m: int = 1
    #: the clip rule's L2 norm bound
    clip: float = 1.0
    weighted: bool = False
    buffer: BufferConfig = field(default_factory=BufferConfig)

    def __post_init__(self) -> None:
        clip = self.clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive number, got {clip!r}")

    @classmethod
    def parse(cls, table: Mapping[str, Any]) -> RobustSettings | None:
        """``None`` for ``{}`` (plain FedAvg); ``ConfigError`` naming any bad key or value."""
        if not table:
            return None
        rule = table.get("rule")
        if rule not in RULES:
            raise ConfigError(f"robust: 'rule' must be one of {', '.join(RULES)}, got {rule!r}")
        allowed = _KEYS[rule]
        unknown = sorted(set(table) - allowed - {"rule"})
        if unknown:
            raise ConfigError(
                f"robust: unknown key {unknown[0]!r} for rule {rule!r} (it takes: {', '.join(sorted(allowed))})"
            )
        required = _REQUIRED.get(rule)
        if required is not None and required not in table:
            what = "the number of attackers to tolerate" if rule == "krum" else "the L2 norm bound"
            raise ConfigError(f"robust: rule {rule!r} needs {required!r} ({what})")
        values = {key: table[key] for key in ("beta", "f", "m", "clip", "weighted") if key in table}
        if "weighted" in values and not isinstance(values["weighted"], bool):
            raise ConfigError(f"robust: 'weighted' must be true or false, got {values['weighted']!r}")
        try:
            buffer = BufferConfig(
                max_bytes=_megabytes(table.get("max_buffer_mb", 512)), dtype=table.get("dtype", "float32")
            )
            settings = cls(rule=cast(RuleName, rule), buffer=buffer, **values)
            if settings.buffered:
                settings.make_rule()  # the rule's own checks (beta range, f and m types)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"robust: {exc}") from exc
        return settings

    @property
    def buffered(self) -> bool:
        """True for the rules that need every update at once (an :class:`UpdateBuffer`)."""
        return self.rule != "clip"

    def make_rule(self) -> RowRule:
        """The buffered rule (``ValueError`` for the streaming clip rule, or a bad value)."""
        if self.rule == "median":
            return Median(weighted=self.weighted)
        if self.rule == "trimmed_mean":
            return TrimmedMean(beta=self.beta, weighted=self.weighted)
        if self.rule == "krum":
            return Krum(f=self.f, m=self.m, weighted=self.weighted)
        raise ValueError("the clip rule streams: it has no buffered rule")

    @property
    def min_updates(self) -> int:
        """The fewest updates with which the rule can still outvote one bad update.

        Median: 3. Trimmed mean: the smallest ``n`` with ``floor(beta × n) >= 1`` (1 if ``beta``
        is 0). Krum: ``2f + 3`` (and at least ``m``). Clip: 1 (clipping bounds every update).
        """
        if self.rule == "median":
            return 3
        if self.rule == "trimmed_mean":
            if self.beta <= 0:
                return 1
            n = max(1, math.ceil(1.0 / self.beta) - 1)
            while math.floor(self.beta * n) < 1:
                n += 1
            return n
        if self.rule == "krum":
            return max(2 * self.f + 3, self.m)
        return 1

    def describe(self) -> str:
        """E.g. ``krum f=2 m=1`` (for logs and abandonment reasons)."""
        if self.rule == "trimmed_mean":
            return f"trimmed_mean beta={self.beta:g}"
        if self.rule == "krum":
            return f"krum f={self.f} m={self.m}"
        if self.rule == "clip":
            return f"clip {self.clip:g}"
        return "median"


def _megabytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"max_buffer_mb must be a positive number, got {value!r}")
    return max(1, int(value * 2**20))


def parse_trust(table: Mapping[str, Any] | None) -> TrustConfig | None:
    """``None`` (trust off) or the :class:`TrustConfig` the table describes (``ConfigError`` if bad)."""
    if table is None:
        return None
    known = {f.name for f in dataclasses.fields(TrustConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"trust: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return TrustConfig(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trust: {exc}") from exc
