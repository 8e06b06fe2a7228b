"""``fedflock broker --config broker.toml``: the server's settings, parsed once into :class:`BrokerSettings`.

The file's tables map 1:1 onto :class:`~broker_server.server_config.ServerConfig` fields and the
run-time settings (an annotated example: ``deploy/broker/broker.toml``; every key: docs/operations.md)::

    [server]          bundle, out, test_data, store, rounds, clients_per_round, min_clients,
                      min_reports, wait_for_clients_s, round_timeout_s, local_epochs, batch_size,
                      lr, server_lr, seed, freeze, model_channel, model_version, mode, late_updates
    [mqtt]            url, client_id, topic_prefix, username, password_file, ca_file, cert_file,
                      key_file, protocol (the agent's [mqtt] keys and checks, plus client_id)
    [selection]       over_selection, stratify, max_rounds_per_window, budget_window_s
    [codecs]          offer, chunk_bytes
    [ops]             port, host
    [ota]             signing_key (a PEM Ed25519 key, 0600: every MODEL is signed; docs/security.md),
                      statement_lifetime (default "24h"; "none": statements without expiry)
    [hyperparameters] NAME = number or [numbers], sent in every task
    [strategy] [robust] [trust] [asynchronous] [rollout] [privacy] [clusters] [secagg] [blobs]
                      passed to ServerConfig as tables ([blobs]: docs/blobs.md; its root is a path)

**Precedence.** Built-in defaults, then the file, then the flags given on the command line: a flag
overrides the file key it names (table ``FLAG_KEYS``), whatever its value. ``--freeze`` and
``--codecs`` replace the file's lists; ``--strategy NAME`` and ``--robust RULE[:VALUE]`` replace
the file's whole ``[strategy]`` / ``[robust]`` table; ``--trust`` turns trust on (keeping the
file's ``[trust]`` settings); ``--strategy-option``, ``--robust-option``, ``--trust-option``,
``--async-option`` and ``--hyperparameter`` set single keys on top of the table that results.

**Paths.** Relative paths in the file (``bundle``, ``out``, ``test_data``, a SQLite ``store``, the
``[mqtt]`` files) resolve against the file's directory; relative paths given as flags against the
current directory. A ``[trust]`` table, even empty, turns tiered trust on; an absent one leaves it off.

Every mistake is a :class:`ConfigError` naming the key (and its flag, if it has one); an unknown
key is refused with the valid ones listed. Nothing is opened or connected here.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.config import MqttSettings
from edge_agent.config import parse_mqtt_settings as parse_mqtt_table  # the agent's [mqtt] checks, shared
from edge_agent.errors import ConfigError
from fedflock.broker_values import (
    FLAG_KEYS,
    _bool,
    _choice,
    _hyperparameters,
    _int,
    _model_channel,
    _number,
    _opt,
    _opt_int,
    _opt_number,
    _opt_path,
    _positive,
    _str,
    _str_list,
    _text,
    _where,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 installs tomli (pyproject marker)
    import tomli as tomllib

if TYPE_CHECKING:
    from broker_server.server_config import ServerConfig

__all__ = [
    "FIXED_TABLES",
    "FLAG_KEYS",
    "OPEN_TABLES",
    "BrokerSettings",
    "Document",
    "OpsSettings",
    "build_settings",
    "normalize_document",
    "read_document",
]

#: a parsed file or flag layer: table name -> key -> value (TOML types; paths absolute)
Document = dict[str, dict[str, Any]]

SERVER_KEYS = (
    "bundle",
    "out",
    "test_data",
    "store",
    "rounds",
    "clients_per_round",
    "min_clients",
    "min_reports",
    "wait_for_clients_s",
    "round_timeout_s",
    "local_epochs",
    "batch_size",
    "lr",
    "server_lr",
    "seed",
    "freeze",
    "model_channel",
    "model_version",
    "mode",
    "late_updates",
)
MQTT_KEYS = (
    "url",
    "client_id",
    "topic_prefix",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "protocol",
)
#: tables whose keys are fixed here
FIXED_TABLES: dict[str, tuple[str, ...]] = {
    "server": SERVER_KEYS,
    "mqtt": MQTT_KEYS,
    "selection": ("over_selection", "stratify", "max_rounds_per_window", "budget_window_s"),
    "codecs": ("offer", "chunk_bytes"),
    "ops": ("port", "host"),
    "ota": ("signing_key", "statement_lifetime"),
}
#: tables whose keys their own parsers check (ServerConfig, the strategy, robust, trust, async and rollout parsers)
OPEN_TABLES = (
    "hyperparameters",
    "strategy",
    "robust",
    "trust",
    "asynchronous",
    "rollout",
    "privacy",
    "clusters",
    "secagg",
    "blobs",
    "scaleout",  # read by fedflock.broker_scaleout (--role), checked by broker_server.scaleout.parse_scaleout
)
_PATH_KEYS = {"server": ("bundle", "out", "test_data"), "mqtt": ("password_file", "ca_file", "cert_file", "key_file")}
_PATH_KEYS["ota"] = ("signing_key",)

#: fedflock broker waits longer for its first devices than a library ServerConfig (60 s)
DEFAULT_WAIT_FOR_CLIENTS_S = 300.0
DEFAULT_OUT = Path("fedflock-server")
DEFAULT_OPS_HOST = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class OpsSettings:
    #: serve /metrics, /api/status, /healthz, /readyz and the dashboard here (None: off)
    port: int | None = None
    host: str = DEFAULT_OPS_HOST


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Everything ``fedflock broker`` runs with, validated; paths are absolute."""

    server: ServerConfig
    bundle: Path
    out: Path
    test_data: Path | None = None
    #: ``sqlite:///abs/path.db`` or ``postgresql://...`` (None: no durable store)
    store: str | None = None
    mqtt: MqttSettings
    #: the server's MQTT client id (None: ``fedflock-server-<random>`` per start)
    client_id: str | None = None
    ops: OpsSettings = OpsSettings()
    #: ``[ota] signing_key``: sign every MODEL with this Ed25519 key (None: unsigned)
    signing_key: Path | None = None
    #: ``[ota] statement_lifetime`` in seconds: signed statements expire and are re-signed (None: no
    #: expiry); the default is broker_server.pki.release_signer.DEFAULT_STATEMENT_LIFETIME_S (a day)
    statement_lifetime_s: float | None = 86400.0


def read_document(path: Path) -> Document:
    """The file at ``path`` as a normalized :data:`Document` (``ConfigError`` if unreadable or not TOML)."""
    source = path.expanduser().resolve()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read broker config {source}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"broker config {source} is not valid TOML: {exc}") from exc
    return normalize_document(raw, base=source.parent)


def normalize_document(raw: Mapping[str, Any], *, base: Path) -> Document:
    """Check the file's tables and keys, resolve its relative paths against ``base``; values are checked later."""
    known = sorted((*FIXED_TABLES, *OPEN_TABLES))
    doc: Document = {}
    for name, table in raw.items():
        if name not in FIXED_TABLES and name not in OPEN_TABLES:
            if name in SERVER_KEYS:
                raise ConfigError(f"{name}: put it in the [server] table")
            raise ConfigError(f"unknown table or key {name!r} (known tables: {', '.join(known)})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table ([{name}]), got {table!r}")
        doc[name] = copy.deepcopy(dict(table))
    for name, keys in FIXED_TABLES.items():
        table = doc.get(name, {})
        if name == "mqtt" and "password" in table:
            raise ConfigError("mqtt.password: put the password in a file and give mqtt.password_file")
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(f"unknown key {name}.{unknown[0]} (known: {', '.join(sorted(keys))})")
        for key in _PATH_KEYS.get(name, ()):
            if isinstance(table.get(key), str):
                table[key] = str((base / Path(table[key]).expanduser()).resolve())
    blobs = doc.get("blobs", {})
    if isinstance(blobs.get("root"), str):  # the local blob store's directory, like the other paths
        blobs["root"] = str((base / Path(blobs["root"]).expanduser()).resolve())
    server = doc.get("server", {})
    if isinstance(server.get("store"), str):
        server["store"] = resolve_store(server["store"], base)
    return doc


def resolve_store(url: str, base: Path) -> str:
    """A SQLite store (``sqlite://PATH`` or a bare path) with a relative path made absolute against ``base``."""
    if url.startswith(("postgresql://", "postgres://")):
        return url
    path = Path(url.removeprefix("sqlite://")).expanduser()
    return f"sqlite://{(base / path).resolve()}"


def build_settings(doc: Document) -> BrokerSettings:
    """Validate a merged document into :class:`BrokerSettings` (``ConfigError`` naming the key)."""
    from broker_server.server_config import ServerConfig
    from edge_agent.protocol.topics import Topics

    server, selection, codecs = doc.get("server", {}), doc.get("selection", {}), doc.get("codecs", {})
    mqtt_table = dict(doc.get("mqtt", {}))
    client_id = _opt(mqtt_table.pop("client_id", None), "mqtt.client_id", str, "a non-empty string")
    if client_id == "":
        raise ConfigError("mqtt.client_id: expected a non-empty string")
    mqtt = parse_mqtt_table(mqtt_table, Path("/"))  # every path is absolute by now
    config = ServerConfig(
        rounds=_int(server, "server", "rounds", ServerConfig.rounds, 1),
        clients_per_round=_int(server, "server", "clients_per_round", ServerConfig.clients_per_round, 1),
        min_clients=_int(server, "server", "min_clients", ServerConfig.min_clients, 1),
        min_reports=_int(server, "server", "min_reports", ServerConfig.min_reports, 1),
        wait_for_clients_s=_number(server, "server", "wait_for_clients_s", DEFAULT_WAIT_FOR_CLIENTS_S, 0.0),
        round_timeout_s=_positive(server, "server", "round_timeout_s", ServerConfig.round_timeout_s),
        local_epochs=_int(server, "server", "local_epochs", ServerConfig.local_epochs, 1),
        batch_size=_int(server, "server", "batch_size", ServerConfig.batch_size, 1),
        lr=_positive(server, "server", "lr", ServerConfig.lr),
        server_lr=_positive(server, "server", "server_lr", ServerConfig.server_lr),
        seed=_int(server, "server", "seed", ServerConfig.seed, 0),
        topics=Topics(_text(mqtt.topic_prefix, "mqtt.topic_prefix")),
        hyperparameters=_hyperparameters(doc.get("hyperparameters", {})),
        frozen=tuple(_str_list(server, "server", "freeze", [], allow_empty=True)),
        codecs=tuple(_str_list(codecs, "codecs", "offer", list(ServerConfig.codecs))),
        chunk_bytes=_int(codecs, "codecs", "chunk_bytes", ServerConfig.chunk_bytes, 1),
        model_channel=_model_channel(server.get("model_channel", ServerConfig.model_channel)),
        model_version=_int(server, "server", "model_version", ServerConfig.model_version, 1),
        strategy=doc.get("strategy", {}),
        over_selection=_positive(selection, "selection", "over_selection", ServerConfig.over_selection),
        stratify=_bool(selection, "selection", "stratify", ServerConfig.stratify),
        max_rounds_per_window=_opt_int(selection, "selection", "max_rounds_per_window"),
        budget_window_s=_opt_number(selection, "selection", "budget_window_s"),
        robust=doc.get("robust", {}),
        trust=doc.get("trust"),
        mode=_choice(server, "server", "mode", ServerConfig.mode, ("sync", "async")),
        asynchronous=doc.get("asynchronous", {}),
        late_updates=_choice(server, "server", "late_updates", ServerConfig.late_updates, ("drop", "async")),
        rollout=doc.get("rollout"),
        privacy=doc.get("privacy"),
        clusters=doc.get("clusters"),
        secagg=doc.get("secagg"),
        blobs=doc.get("blobs"),
    )
    ops = doc.get("ops", {})
    port = _opt_int(ops, "ops", "port")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{_where('ops.port')}: must be a port number 1-65535, got {port}")
    bundle = _opt_path(server, "bundle")
    if bundle is None:
        raise ConfigError(f"{_where('server.bundle')}: missing (the training bundle the server trains)")
    return BrokerSettings(
        server=config,
        bundle=bundle,
        out=_opt_path(server, "out") or DEFAULT_OUT.resolve(),
        test_data=_opt_path(server, "test_data"),
        store=_opt(server.get("store"), "server.store", str, "a store URL (sqlite:///PATH or postgresql://...)"),
        mqtt=mqtt,
        client_id=client_id,
        ops=OpsSettings(port=port, host=_str(ops, "ops", "host", DEFAULT_OPS_HOST)),
        signing_key=_signing_key(doc.get("ota", {})),
        statement_lifetime_s=_statement_lifetime(doc.get("ota", {})),
    )


def _statement_lifetime(ota: Mapping[str, Any]) -> float | None:
    from broker_server.pki.release_signer import DEFAULT_STATEMENT_LIFETIME_S, parse_statement_lifetime

    if "statement_lifetime" not in ota:
        return DEFAULT_STATEMENT_LIFETIME_S
    return parse_statement_lifetime(ota["statement_lifetime"], key="ota.statement_lifetime")


def _signing_key(ota: Mapping[str, Any]) -> Path | None:
    value = _opt(ota.get("signing_key"), "ota.signing_key", str, "the path of a PEM Ed25519 private key")
    if value is not None and not Path(value).is_file():
        raise ConfigError(f"ota.signing_key: {value} is not a file (make one: fedflock pki signing-key)")
    return None if value is None else Path(value)
