"""The agent config file's ``[ota]`` table (edge_agent.config): which keys models must be signed by,
and how long what they sign holds.

``trusted_keys`` (a list of 64-hex Ed25519 public keys) and ``trusted_keys_file`` (a path, relative
to the config file: one hex key a line, blank lines and ``#`` comments skipped) are merged; either
may be absent. No key at all: models are not authenticated (the agent warns at start).

``require_expiry`` (default false: docs/security.md, "Statement expiry", says why) refuses signed
release statements without ``expires_at``; ``max_clock_skew_s`` (default 300) is how far the
device clock may differ from the server's before a statement counts as expired or not yet valid
(:mod:`edge_agent.crypto.freshness`). ``require_expiry = true`` without a trusted key is refused:
it would promise a check that never runs. Every mistake is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.crypto.freshness import DEFAULT_MAX_CLOCK_SKEW_S, FreshnessPolicy
from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import ConfigError

__all__ = ["OTA_KEYS", "parse_ota_table"]

OTA_KEYS = ("trusted_keys", "trusted_keys_file", "require_expiry", "max_clock_skew_s")


def parse_ota_table(table: Mapping[str, Any], base: Path) -> TrustedKeys:
    """The trusted keys an ``[ota]`` table names (empty when it names none), with its freshness policy."""
    unknown = sorted(set(table) - set(OTA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key ota.{unknown[0]} (known: {', '.join(OTA_KEYS)})")
    policy = FreshnessPolicy(
        require_expiry=table.get("require_expiry", False),
        max_clock_skew_s=table.get("max_clock_skew_s", DEFAULT_MAX_CLOCK_SKEW_S),
    )
    keys = _keys(table, base)
    if policy.require_expiry and not keys:
        raise ConfigError("ota.require_expiry: statements are checked only against trusted keys: set ota.trusted_keys")
    return TrustedKeys(keys, freshness=policy)


def _keys(table: Mapping[str, Any], base: Path) -> tuple[bytes, ...]:
    listed = table.get("trusted_keys", [])
    if not isinstance(listed, list) or not all(isinstance(key, str) for key in listed):
        raise ConfigError(f"ota.trusted_keys: expected a list of hex strings, got {listed!r}")
    keys = TrustedKeys.parse(listed, source="ota.trusted_keys").keys
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
    return (*keys, *(k for k in from_file.keys if k not in keys))
