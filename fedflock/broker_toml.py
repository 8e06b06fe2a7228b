"""``fedflock broker --print-config``: the resolved settings as a TOML document ``--config`` reads back.

:func:`settings_document` turns :class:`~fedflock.broker_config.BrokerSettings` into the tables of
a ``broker.toml`` (defaults filled in, paths absolute), :func:`render_toml` writes them. The writer
covers what those tables hold: strings, booleans, integers, floats (``inf``/``nan`` included),
arrays and inline tables. ``None`` means "not set" and is left out. No secret is printed: the file
holds the password file's path, never a password.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fedflock.broker_config import BrokerSettings, Document

if TYPE_CHECKING:
    from broker_server.scaleout import ScaleoutSettings

__all__ = ["render_settings", "render_toml", "settings_document"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TABLE_ORDER = (
    "server",
    "mqtt",
    "selection",
    "codecs",
    "ops",
    "hyperparameters",
    "strategy",
    "robust",
    "trust",
    "asynchronous",
    "rollout",
    "clusters",
    "privacy",
    "secagg",
    "blobs",
    "ota",
    "scaleout",
)


def render_settings(settings: BrokerSettings, scaleout: ScaleoutSettings | None = None) -> str:
    return render_toml(settings_document(settings, scaleout))


def settings_document(settings: BrokerSettings, scaleout: ScaleoutSettings | None = None) -> Document:
    """The ``broker.toml`` tables that describe ``settings`` exactly (``--config`` of it gives them back).

    ``scaleout``: the resolved ``[scaleout]`` table, when scale-out is configured (an empty
    ``worker_id`` — "``<hostname>-<pid>``" of each worker — is left out).
    """
    config, mqtt = settings.server, settings.mqtt
    doc: Document = {
        "server": {
            "bundle": str(settings.bundle),
            "out": str(settings.out),
            "test_data": None if settings.test_data is None else str(settings.test_data),
            "store": settings.store,
            "rounds": config.rounds,
            "clients_per_round": config.clients_per_round,
            "min_clients": config.min_clients,
            "min_reports": config.min_reports,
            "wait_for_clients_s": config.wait_for_clients_s,
            "round_timeout_s": config.round_timeout_s,
            "local_epochs": config.local_epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "server_lr": config.server_lr,
            "seed": config.seed,
            "freeze": list(config.frozen),
            "model_channel": False if config.model_channel is None else config.model_channel,
            "model_version": config.model_version,
            "mode": config.mode,
            "late_updates": config.late_updates,
        },
        "mqtt": {
            "url": mqtt.url,
            "client_id": settings.client_id,
            "topic_prefix": mqtt.topic_prefix,
            "username": mqtt.username,
            "password_file": _path(mqtt.password_file),
            "ca_file": _path(mqtt.ca_file),
            "cert_file": _path(mqtt.cert_file),
            "key_file": _path(mqtt.key_file),
            "protocol": mqtt.protocol,
        },
        "selection": {
            "over_selection": config.over_selection,
            "stratify": config.stratify,
            "max_rounds_per_window": config.max_rounds_per_window,
            "budget_window_s": config.budget_window_s,
        },
        "codecs": {"offer": list(config.codecs), "chunk_bytes": config.chunk_bytes},
        "ops": {"port": settings.ops.port, "host": settings.ops.host},
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in config.hyperparameters.items()},
    }
    optional = {
        "strategy": config.strategy or None,
        "robust": config.robust or None,
        "trust": config.trust,  # {} is "on, with the defaults"
        "asynchronous": config.asynchronous or None,
        "rollout": config.rollout,
        "clusters": config.clusters,
        "privacy": config.privacy,
        "secagg": config.secagg,
        "blobs": config.blobs,
    }
    doc.update({name: dict(table) for name, table in optional.items() if table is not None})
    if scaleout is not None:
        doc["scaleout"] = {key: value for key, value in asdict(scaleout).items() if value != "" or key != "worker_id"}
    if settings.signing_key is not None:
        lifetime = settings.statement_lifetime_s
        doc["ota"] = {
            "signing_key": str(settings.signing_key),
            "statement_lifetime": "none" if lifetime is None else f"{lifetime:g}s",
        }
    return doc


def render_toml(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """``doc``'s tables as TOML text, in the order of the reference (docs/operations.md)."""
    names = [n for n in _TABLE_ORDER if n in doc] + sorted(set(doc) - set(_TABLE_ORDER))
    blocks = []
    for name in names:
        lines = [f"[{_key(name)}]"]
        lines += [f"{_key(key)} = {_value(value)}" for key, value in doc[name].items() if value is not None]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _path(value: Any) -> str | None:
    return None if value is None else str(value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
