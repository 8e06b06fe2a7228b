"""The ``asynchronous`` table of :class:`~broker_server.server_config.ServerConfig`: FedBuff settings.

Parsed once (:func:`parse_async`), with every error a :class:`ConfigError` naming the key
(``asynchronous.<key>``). The keys, which the CLI's ``--async-option KEY=VALUE`` and a TOML
``[asynchronous]`` table fill:

=====================  ==================================================================  =======================
key                    meaning                                                             default
=====================  ==================================================================  =======================
``buffer_size``        updates per buffer: a new model version every ``buffer_size``       10
``concurrency``        TASKs outstanding at once                                           2 × buffer_size
``max_staleness``      an update more versions behind than this is refused ("stale")       8
``staleness``          ``polynomial`` (1/(1+s)^a) | ``constant`` (1) | ``hinge``           polynomial
``staleness_exponent`` a of the polynomial                                                 0.5 (FedBuff's 1/√(1+s))
``hinge_a``            hinge slope: 1 up to b versions behind, then 1/(a·(s−b)+1)          10
``hinge_b``            hinge threshold b (versions)                                        4
``task_timeout_s``     a device that has not answered by then gets no more waiting         round_timeout_s
``versions``           model versions an asynchronous run makes                            rounds
=====================  ==================================================================  =======================

``staleness_exponent`` only goes with ``polynomial``, ``hinge_a``/``hinge_b`` only with ``hinge``.
In sync mode with ``late_updates = "async"`` the staleness keys weigh the stragglers' updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from broker_server.fedbuff import FedBuffConfig
from broker_server.staleness import ConstantStaleness, HingeStaleness, PolynomialStaleness, StalenessFn
from edge_agent.errors import ConfigError

__all__ = ["KEYS", "AsyncSettings", "parse_async"]

StalenessName = Literal["polynomial", "constant", "hinge"]
KEYS = frozenset(
    {
        "buffer_size",
        "concurrency",
        "max_staleness",
        "staleness",
        "staleness_exponent",
        "hinge_a",
        "hinge_b",
        "task_timeout_s",
        "versions",
    }
)
_ONLY_WITH = {"staleness_exponent": "polynomial", "hinge_a": "hinge", "hinge_b": "hinge"}


@dataclass(frozen=True, kw_only=True)
class AsyncSettings:
    buffer_size: int = 10
    concurrency: int = 20
    max_staleness: int = 8
    staleness: StalenessName = "polynomial"
    staleness_exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4
    task_timeout_s: float = 60.0
    versions: int = 20

    def staleness_fn(self) -> StalenessFn:
        if self.staleness == "constant":
            return ConstantStaleness()
        if self.staleness == "hinge":
            return HingeStaleness(threshold=self.hinge_b, slope=self.hinge_a)
        return PolynomialStaleness(exponent=self.staleness_exponent)

    def fedbuff_config(self, codecs: frozenset[str], *, buffer_size: int | None = None) -> FedBuffConfig:
        """The FedBuff configuration (``buffer_size`` overrides the table's, e.g. for late updates)."""
        size = self.buffer_size if buffer_size is None else buffer_size
        return FedBuffConfig(
            buffer_size=size,
            max_staleness=self.max_staleness,
            staleness=self.staleness_fn(),
            codecs=codecs,
            max_remembered_keys=max(size, 1_000_000),
        )


def parse_async(table: Mapping[str, Any], *, rounds: int, round_timeout_s: float) -> AsyncSettings:
    """The settings ``table`` describes; ``rounds`` and ``round_timeout_s`` give the defaults."""
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(f"asynchronous.{unknown[0]}: unknown key (known: {', '.join(sorted(KEYS))})")
    staleness = table.get("staleness", "polynomial")
    if staleness not in ("polynomial", "constant", "hinge"):
        raise ConfigError(f"asynchronous.staleness: must be 'polynomial', 'constant' or 'hinge', got {staleness!r}")
    for key, needs in _ONLY_WITH.items():
        if key in table and staleness != needs:
            raise ConfigError(f"asynchronous.{key}: only applies to staleness = {needs!r} (it is {staleness!r})")
    buffer_size = _integer(table, "buffer_size", 10, minimum=1)
    settings = AsyncSettings(
        buffer_size=buffer_size,
        concurrency=_integer(table, "concurrency", 2 * buffer_size, minimum=1),
        max_staleness=_integer(table, "max_staleness", 8, minimum=0),
        staleness=staleness,
        staleness_exponent=_number(table, "staleness_exponent", 0.5, positive=False),
        hinge_a=_number(table, "hinge_a", 10.0, positive=False),
        hinge_b=_integer(table, "hinge_b", 4, minimum=0),
        task_timeout_s=_number(table, "task_timeout_s", round_timeout_s, positive=True),
        versions=_integer(table, "versions", rounds, minimum=1),
    )
    try:
        settings.fedbuff_config(frozenset({"fp32"}))  # the staleness function's weights in (0, 1]
    except ConfigError as exc:
        raise ConfigError(f"asynchronous.staleness: {exc.reason}") from exc
    return settings


def _integer(table: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"asynchronous.{key}: must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"asynchronous.{key}: must be >= {minimum}, got {value}")
    return value


def _number(table: Mapping[str, Any], key: str, default: float, *, positive: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"asynchronous.{key}: must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"asynchronous.{key}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)
