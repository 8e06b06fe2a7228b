"""Typed readers for broker.toml values: every error names its key and the flag that sets it.

Split out of :mod:`fedflock.broker_config` (which parses the document with them); ``FLAG_KEYS``
maps each ``fedflock broker`` flag onto the file key it overrides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

#: the flag (argparse dest) that overrides each file key (``--round-timeout`` sets server.round_timeout_s)
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "bundle": ("server", "bundle"),
    "out": ("server", "out"),
    "test_data": ("server", "test_data"),
    "store": ("server", "store"),
    "rounds": ("server", "rounds"),
    "clients_per_round": ("server", "clients_per_round"),
    "min_clients": ("server", "min_clients"),
    "min_reports": ("server", "min_reports"),
    "wait_for_clients": ("server", "wait_for_clients_s"),
    "round_timeout": ("server", "round_timeout_s"),
    "local_epochs": ("server", "local_epochs"),
    "batch_size": ("server", "batch_size"),
    "lr": ("server", "lr"),
    "seed": ("server", "seed"),
    "freeze": ("server", "freeze"),
    "mode": ("server", "mode"),
    "late_updates": ("server", "late_updates"),
    "mqtt_url": ("mqtt", "url"),
    "topic_prefix": ("mqtt", "topic_prefix"),
    "over_selection": ("selection", "over_selection"),
    "stratify": ("selection", "stratify"),
    "max_rounds_per_window": ("selection", "max_rounds_per_window"),
    "budget_window": ("selection", "budget_window_s"),
    "codecs": ("codecs", "offer"),
    "chunk_bytes": ("codecs", "chunk_bytes"),
    "ops_port": ("ops", "port"),
    "ops_host": ("ops", "host"),
}
_FLAG_OF = {f"{table}.{key}": "--" + dest.replace("_", "-") for dest, (table, key) in FLAG_KEYS.items()}


# -- value checks: every message names the key (and the flag that sets it) ----------------------


def _where(key: str) -> str:
    flag = _FLAG_OF.get(key)
    return f"{key} ({flag})" if flag else key


def _int(table: Mapping[str, Any], name: str, key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(f'{name}.{key}')}: expected an integer >= {minimum}, got {value!r}")
    return value


def _number(table: Mapping[str, Any], name: str, key: str, default: float, minimum: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{_where(f'{name}.{key}')}: expected a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _positive(table: Mapping[str, Any], name: str, key: str, default: float) -> float:
    value = _number(table, name, key, default, 0.0)
    if value <= 0:
        raise ConfigError(f"{_where(f'{name}.{key}')}: must be > 0, got {table.get(key)!r}")
    return value


def _bool(table: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(f'{name}.{key}')}: expected true or false, got {value!r}")
    return value


def _str(table: Mapping[str, Any], name: str, key: str, default: str) -> str:
    return _text(table.get(key, default), f"{name}.{key}")


def _choice(table: Mapping[str, Any], name: str, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise ConfigError(f"{_where(f'{name}.{key}')}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(key)}: expected a non-empty string, got {value!r}")
    return value


def _opt(value: Any, key: str, kind: type, what: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{_where(key)}: expected {what}, got {value!r}")
    return value


def _opt_int(table: Mapping[str, Any], name: str, key: str) -> int | None:
    return None if table.get(key) is None else _int(table, name, key, 0, 1)


def _opt_number(table: Mapping[str, Any], name: str, key: str) -> float | None:
    return None if table.get(key) is None else _positive(table, name, key, 1.0)


def _opt_path(table: Mapping[str, Any], key: str) -> Path | None:
    value = _opt(table.get(key), f"server.{key}", str, "a path")
    return None if value is None else Path(value)


def _str_list(
    table: Mapping[str, Any], name: str, key: str, default: list[str], *, allow_empty: bool = False
) -> list[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{_where(f'{name}.{key}')}: expected a list of names, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"{_where(f'{name}.{key}')}: must name at least one")
    return value


def _model_channel(value: Any) -> str | None:
    if value is False:
        return None  # no announcement
    if not isinstance(value, str) or not value:
        raise ConfigError(f"server.model_channel: expected a channel name or false, got {value!r}")
    return value


def _hyperparameters(table: Mapping[str, Any]) -> dict[str, float | tuple[float, ...]]:
    out: dict[str, float | tuple[float, ...]] = {}
    for name, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"hyperparameters.{name}: expected a number or a list of numbers, got {value!r}")
        floats = tuple(float(v) for v in values)
        out[name] = floats if isinstance(value, list) else floats[0]
    return out
