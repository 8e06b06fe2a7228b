"""The device agent's config file (``fedflock agent --config agent.toml``), parsed once at start.

Every table is optional except ``device_id``, ``bundle`` and ``[data]``; relative paths are
relative to the config file. Example (also :data:`AGENT_CONFIG_EXAMPLE`, which a test parses)::

    device_id = "pi-kitchen-01"      # 1-64 of A-Z a-z 0-9 _ -; also the MQTT client id
    device_class = "pi"              # picks the participation budget ([policy.budget])
    state_dir = "/var/lib/fedflock"  # store, checkpoints, models, residuals, personal tensors
    bundle = "/opt/fedflock/bundle"  # the first model; later versions are installed into state_dir

    [mqtt]
    url = "mqtts://broker.example.org:8883"   # mqtt:// (1883) or mqtts:// (TLS, 8883)
    username = "pi-kitchen-01"
    password_file = "/etc/fedflock/password"  # never the password itself in this file
    ca_file = "/etc/fedflock/ca.pem"          # TLS: the broker's CA (default: the system's)
    cert_file = "/etc/fedflock/device.pem"    # mutual TLS (both or neither)
    key_file = "/etc/fedflock/device.key"
    topic_prefix = "fedflock/v1"
    protocol = "auto"                         # "auto" (MQTT 5, else 3.1.1), "5" or "3.1.1"

    [data]                           # edge_agent.datasources.parse_data_config
    kind = "csv"
    path = "/var/lib/fedflock/data/readings.csv"
    label_column = "label"

    [policy]                         # edge_agent.device.policy.parse_policy
    min_battery_percent = 60

    [network]                        # interface name or glob -> billed by volume
    metered = { "wwan*" = true, "usb0" = true }
    use_nmcli = true                 # no entry matches: ask NetworkManager (nmcli)

    [codecs]                         # ethernet|wifi|cellular|none|unknown -> update codecs to prefer
    cellular = ["topk-int8:0.01", "int4"]

    [agent]
    monitor_interval_s = 30          # sensor sampling
    result_ttl_hours = 72            # an undelivered result older than this is dropped (logged)
    retention_days = 7               # delivered results and participation history
    chunk_kib = 256                  # uploads larger than this travel as acknowledged chunks
    error_feedback = true            # carry what a lossy codec dropped into the next update
    seed = 0                         # randomness: batch order, codec rounding, retry jitter

    [privacy]                        # optional local DP (edge_agent.privacy; docs/privacy.md)
    clip_norm = 1.0                  # C: the update is scaled to L2 norm <= C ...
    noise_multiplier = 5.0           # ... and gets N(0, (z C)^2) noise before it is encoded
    delta = 1e-5                     # the δ of the ε reported per round (UPDATE metric local_dp_epsilon)

    [ota]                            # signed models (docs/security.md, "Signed artifacts")
    trusted_keys = []                # Ed25519 public keys, 64 hex each (`fedflock pki signing-key`)
    # trusted_keys_file = "/etc/fedflock/trusted_keys"  # and/or: one hex key a line
    max_clock_skew_s = 300           # statements hold from issued_at - this to expires_at + this
    # require_expiry = true          # refuse statements without expires_at (once the server signs v2)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.codecs import DEFAULT_PREFERENCES
from edge_agent.crypto.trust import TrustedKeys
from edge_agent.datasources import DataConfig, parse_data_config
from edge_agent.device.network import NetworkConfig
from edge_agent.device.policy import Policy, parse_policy
from edge_agent.device.state import NETWORK_KINDS
from edge_agent.errors import ConfigError
from edge_agent.ota.ota_config import parse_ota_table
from edge_agent.privacy import LocalDPConfig
from edge_agent.protocol.task_fields import MIN_CHUNK_BYTES
from edge_agent.protocol.topics import DEFAULT_PREFIX, validate_device_id
from edge_agent.transport.backoff import RECONNECT_KEYS, ReconnectSettings, parse_reconnect_table
from edge_agent.transport.mqtt_config import parse_broker_url, validate_protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices install tomli (pyproject marker)
    import tomli as tomllib

_TOP_KEYS = {
    *("device_id", "device_class", "state_dir", "bundle", "mqtt", "data", "policy", "network", "codecs", "agent"),
    "privacy",
    "ota",
}
_MQTT_KEYS = {
    "url",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "topic_prefix",
    "protocol",
    *RECONNECT_KEYS,
}
_AGENT_KEYS = {"monitor_interval_s", "result_ttl_hours", "retention_days", "chunk_kib", "error_feedback", "seed"}


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = DEFAULT_PREFIX
    protocol: str = "auto"
    #: reconnect backoff: ``reconnect_min_s``, ``reconnect_max_s``, ``reconnect_jitter`` (full jitter by default)
    reconnect: ReconnectSettings = field(default_factory=ReconnectSettings)


@dataclass(frozen=True, kw_only=True)
class AgentFileConfig:
    """Everything ``fedflock agent --config`` needs, validated; paths are absolute."""

    path: Path
    device_id: str
    device_class: str
    state_dir: Path
    bundle: Path
    mqtt: MqttSettings
    data: DataConfig
    policy: Policy
    network: NetworkConfig
    codec_preferences: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCES))
    monitor_interval_s: float = 30.0
    result_ttl_s: float = 72 * 3600.0
    retention_s: float = 7 * 86400.0
    chunk_bytes: int = 256 * 1024
    error_feedback: bool = True
    seed: int = 0
    #: ``[privacy]``: local DP on every update (None: off)
    privacy: LocalDPConfig | None = None
    #: ``[ota]`` trusted keys: MODELs and bundles must be signed by one (empty: not authenticated)
    trusted_keys: TrustedKeys = field(default_factory=lambda: TrustedKeys(()))


def load_agent_config(path: str | Path) -> AgentFileConfig:
    """Read and validate an agent config file; every problem is a :class:`ConfigError` naming the key."""
    source = Path(path).expanduser().resolve()
    try:
        table = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {source}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"agent config {source} is not valid TOML: {exc}") from exc
    return parse_agent_config(table, path=source)


def parse_agent_config(table: Mapping[str, Any], *, path: Path) -> AgentFileConfig:
    """Validate a parsed TOML document; relative paths resolve against ``path``'s directory."""
    _no_unknown(table, _TOP_KEYS, "")
    base = path.parent
    device_id = _required_str(table, "device_id")
    try:
        validate_device_id(device_id)
    except ConfigError as exc:
        raise ConfigError(f"device_id: {exc.reason}") from exc
    device_class = _str(table, "device_class", "default")
    if not device_class:
        raise ConfigError("device_class: expected a non-empty string")
    if "data" not in table:
        raise ConfigError("[data]: missing (where this device's training data lives)")
    agent = _table(table, "agent")
    _no_unknown(agent, _AGENT_KEYS, "agent.")
    policy = parse_policy(_table(table, "policy"), device_class=device_class)
    retention_s = _positive(agent, "retention_days", 7.0, "agent.") * 86400.0
    if policy.budget is not None:  # the history must cover the budget's window
        retention_s = max(retention_s, policy.budget.period_s)
    chunk_bytes = int(_positive(agent, "chunk_kib", 256, "agent.") * 1024)
    if chunk_bytes < MIN_CHUNK_BYTES:
        raise ConfigError(f"agent.chunk_kib: must be >= {MIN_CHUNK_BYTES / 1024:g}, got {agent['chunk_kib']!r}")
    seed = agent.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"agent.seed: expected an integer >= 0, got {seed!r}")
    return AgentFileConfig(
        path=path,
        device_id=device_id,
        device_class=device_class,
        state_dir=_path(table, "state_dir", base) or base / f"{device_id}.state",
        bundle=_path(table, "bundle", base) or _missing("bundle"),
        mqtt=parse_mqtt_settings(_table(table, "mqtt"), base),
        data=parse_data_config(_table(table, "data"), base_dir=base),
        policy=policy,
        network=_network(_table(table, "network")),
        codec_preferences=_codecs(_table(table, "codecs")),
        monitor_interval_s=_positive(agent, "monitor_interval_s", 30.0, "agent."),
        result_ttl_s=_positive(agent, "result_ttl_hours", 72.0, "agent.") * 3600.0,
        retention_s=retention_s,
        chunk_bytes=chunk_bytes,
        error_feedback=_bool(agent, "error_feedback", True, "agent."),
        seed=seed,
        privacy=LocalDPConfig.parse(_table(table, "privacy")) if "privacy" in table else None,
        trusted_keys=parse_ota_table(_table(table, "ota"), base),
    )


def parse_mqtt_settings(table: Mapping[str, Any], base: Path) -> MqttSettings:
    """An ``[mqtt]`` table (shared by ``agent.toml`` and ``broker.toml``); relative paths resolve against ``base``."""
    if "password" in table:  # before the unknown-key check, which would not say what to do instead
        raise ConfigError("mqtt.password: put the password in a file and give mqtt.password_file")
    _no_unknown(table, _MQTT_KEYS, "mqtt.")
    settings = MqttSettings(
        url=_str(table, "url", MqttSettings.url, "mqtt."),
        username=_str(table, "username", None, "mqtt."),
        password_file=_path(table, "password_file", base, "mqtt."),
        ca_file=_path(table, "ca_file", base, "mqtt."),
        cert_file=_path(table, "cert_file", base, "mqtt."),
        key_file=_path(table, "key_file", base, "mqtt."),
        topic_prefix=_str(table, "topic_prefix", DEFAULT_PREFIX, "mqtt."),
        protocol=_str(table, "protocol", "auto", "mqtt."),
        reconnect=parse_reconnect_table(table, "mqtt."),
    )
    if (settings.cert_file is None) != (settings.key_file is None):
        raise ConfigError("mqtt.cert_file and mqtt.key_file go together (mutual TLS)")
    if settings.password_file is not None and settings.username is None:
        raise ConfigError("mqtt.password_file needs mqtt.username")
    try:
        address = parse_broker_url(settings.url)
    except ConfigError as exc:
        raise ConfigError(f"mqtt.url: {exc.reason}") from exc
    try:
        validate_protocol(settings.protocol)
    except ConfigError as exc:
        raise ConfigError(f"mqtt.protocol: {exc.reason}") from exc
    if not address.tls and (settings.ca_file is not None or settings.cert_file is not None):
        raise ConfigError(f"mqtt.url: {settings.url!r} is plain mqtt:// but TLS files are given: use mqtts://")
    return settings


def _network(table: Mapping[str, Any]) -> NetworkConfig:
    _no_unknown(table, {"metered", "use_nmcli"}, "network.")
    metered = _table(table, "metered", "network.")
    for pattern, value in metered.items():
        if not isinstance(value, bool):
            raise ConfigError(f"network.metered.{pattern}: expected true or false, got {value!r}")
    return NetworkConfig(metered=dict(metered), use_nmcli=_bool(table, "use_nmcli", True, "network."))


def _codecs(table: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    from edge_agent.codecs import CodecSpec

    preferences = dict(DEFAULT_PREFERENCES)
    for network, names in table.items():
        if network not in NETWORK_KINDS:
            raise ConfigError(f"codecs.{network}: unknown network kind (known: {', '.join(NETWORK_KINDS)})")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"codecs.{network}: expected a non-empty list of codec names")
        for name in names:
            try:
                CodecSpec.parse(name)
            except ConfigError as exc:
                raise ConfigError(f"codecs.{network}: {exc.reason}") from exc
        preferences[network] = tuple(names)
    return preferences


def _no_unknown(table: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")


def _table(table: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}{key}: expected a table, got {type(value).__name__}")
    return value


def _str(table: Mapping[str, Any], key: str, default: Any, prefix: str = "") -> Any:
    value = table.get(key, default)
    if value is not default and not isinstance(value, str):
        raise ConfigError(f"{prefix}{key}: expected a string, got {value!r}")
    return value


def _required_str(table: Mapping[str, Any], key: str) -> str:
    if key not in table:
        _missing(key)
    return str(_str(table, key, None))


def _missing(key: str) -> Any:
    raise ConfigError(f"{key}: missing")


def _path(table: Mapping[str, Any], key: str, base: Path, prefix: str = "") -> Path | None:
    value = _str(table, key, None, prefix)
    if value is None:
        return None
    return (base / Path(value).expanduser()).resolve()


def _number(table: Mapping[str, Any], key: str, default: float, prefix: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{prefix}{key}: expected a number, got {value!r}")
    return float(value)


def _positive(table: Mapping[str, Any], key: str, default: float, prefix: str) -> float:
    value = _number(table, key, default, prefix)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{prefix}{key}: must be a finite number > 0, got {value!r}")
    return value


def _bool(table: Mapping[str, Any], key: str, default: bool, prefix: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}: expected true or false, got {value!r}")
    return value


AGENT_CONFIG_EXAMPLE = __doc__.split("::\n\n", 1)[1] if __doc__ else ""
