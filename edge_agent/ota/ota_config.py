"""The agent config file's ``[ota]`` table (edge_agent.config): which keys models must be signed by.

``trusted_keys`` (a list of 64-hex Ed25519 public keys) and ``trusted_keys_file`` (a path, relative
to the config file: one hex key a line, blank lines and ``#`` comments skipped) are merged; either
may be absent. No key at all: models are not authenticated (the agent warns at start). Every
mistake is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import ConfigError

__all__ = ["OTA_KEYS", "parse_ota_table"]

OTA_KEYS = ("trusted_keys", "trusted_keys_file")


def parse_ota_table(table: Mapping[str, Any], base: Path) -> TrustedKeys:
    """The trusted keys an ``[ota]`` table names (empty when it names none)."""
    unknown = sorted(set(table) - set(OTA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key ota.{unknown[0]} (known: {', '.join(OTA_KEYS)})")
    listed = table.get("trusted_keys", [])
    if not isinstance(listed, list) or not all(isinstance(key, str) for key in listed):
        raise ConfigError(f"ota.trusted_keys: expected a list of hex strings, got {listed!r}")
    keys = TrustedKeys.parse(listed, source="ota.trusted_keys")
    value = table.get("trusted_keys_file")
    if value is None:
        return keys
    if not isinstance(value, str) or not value:
        raise ConfigError(f"ota.trusted_keys_file: expected a path, got {value!r}")
    path = (base / Path(value).expanduser()).resolve()
    source = "ota.trusted_keys_file"
    from_file = TrustedKeys.parse(TrustedKeys.read_file(path, source=source), source=f"{source} ({path})")
    if not from_file:
        raise ConfigError(f"{source}: {path} lists no key")
    return TrustedKeys((*keys.keys, *(k for k in from_file.keys if k not in keys.keys)))
