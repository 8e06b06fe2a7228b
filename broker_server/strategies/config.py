"""Strategies from configuration: ``make_strategy("fedadam", server_lr=0.01)`` or a config table.

A table (TOML ``[strategy]``, a JSON object) names the strategy and sets its fields::

    [strategy]
    name = "fedyogi"
    server_lr = 0.01
    beta1 = 0.9
    beta2 = 0.99
    tau = 0.001

Every mistake is a :class:`ConfigError` naming the key: an unknown strategy (listing the known
ones), a key the strategy does not take (listing those it does), a value of the wrong type or range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from broker_server.strategies.adaptive import AdagradConfig, AdamConfig, FedAdagrad, FedAdam, FedYogi
from broker_server.strategies.base import FedAvgConfig, Strategy
from broker_server.strategies.clustering import ClusterConfig
from broker_server.strategies.fedavg import FedAvg, FedAvgM, FedAvgMConfig, FedProx, FedProxConfig
from edge_agent.errors import ConfigError

C = TypeVar("C")

#: strategy name -> (its config dataclass, the strategy class taking that config)
STRATEGIES: dict[str, tuple[type[FedAvgConfig], Callable[[Any], Strategy]]] = {
    "fedavg": (FedAvgConfig, FedAvg),
    "fedprox": (FedProxConfig, FedProx),
    "fedavgm": (FedAvgMConfig, FedAvgM),
    "fedadagrad": (AdagradConfig, FedAdagrad),
    "fedadam": (AdamConfig, FedAdam),
    "fedyogi": (AdamConfig, FedYogi),
}


def build_config(config_type: type[C], params: Mapping[str, Any], *, where: str) -> C:
    """``config_type(**params)`` with every error a :class:`ConfigError` naming ``where.key``."""
    fields = [f.name for f in dataclasses.fields(config_type)]  # type: ignore[arg-type]
    for key in params:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(fields)}")
    try:
        return config_type(**params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.reason}") from exc


def make_strategy(name: str, **params: Any) -> Strategy:
    """A fresh strategy ``name`` (see :data:`STRATEGIES`) configured by ``params``."""
    entry = STRATEGIES.get(name.lower()) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"strategy: unknown name {name!r}; known: {', '.join(STRATEGIES)}")
    config_type, constructor = entry
    return constructor(build_config(config_type, params, where=f"strategy {name.lower()!r}"))


def parse_strategy(table: Mapping[str, Any] | None) -> Strategy:
    """The strategy a config table describes (``None`` or ``{}``: plain FedAvg)."""
    if not table:
        return FedAvg()
    if not isinstance(table, Mapping):
        raise ConfigError(f"strategy must be a table, got {type(table).__name__}")
    params = dict(table)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"strategy.name must name a strategy ({', '.join(STRATEGIES)}), got {name!r}")
    return make_strategy(name, **params)


def parse_cluster_config(table: Mapping[str, Any] | None) -> ClusterConfig | None:
    """Clustered FL settings from a ``[clusters]`` table; ``None`` (absent) turns clustering off."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"clusters must be a table, got {type(table).__name__}")
    return build_config(ClusterConfig, table, where="clusters")
