"""``fedflock broker`` flags, and how they override ``--config broker.toml`` (:mod:`fedflock.broker_config`).

Every flag defaults to ``None`` here (``store_true`` flags too), so "given on the command line" and
"left out" can be told apart even when a flag repeats a default: a flag given overrides the file
key it names, whatever its value. The defaults themselves live in one place,
:func:`fedflock.broker_config.build_settings`. :func:`resolve_settings` is the whole pipeline:
file layer, flag layer, :func:`merge`, validation.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from fedflock.broker_config import FLAG_KEYS, BrokerSettings, Document, build_settings, read_document, resolve_store
from fedflock.export_options import floats

__all__ = [
    "FlagLayer",
    "add_broker_arguments",
    "flag_layer",
    "hyperparameters",
    "merge",
    "resolve_settings",
    "robust_table",
    "strategy_table",
    "trust_table",
]

#: the ``--X-option`` flag of a table, and what must be set before its options mean anything
_OPTION_FLAGS = {
    "strategy": ("--strategy-option", "--strategy NAME (or [strategy] name in the config file)"),
    "robust": ("--robust-option", "--robust RULE (or [robust] rule in the config file)"),
    "trust": ("--trust-option", "--trust (or a [trust] table in the config file)"),
}
_NEEDS_KEY = {"strategy": "name", "robust": "rule"}


def add_broker_arguments(broker: argparse.ArgumentParser) -> None:
    arg = broker.add_argument
    arg("--config", type=Path, default=None, help="broker.toml (docs/operations.md); flags given override its keys")
    arg("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")
    arg("--bundle", type=Path, default=None, help="training bundle directory (required, here or in the file)")
    arg("--mqtt-url", default=None, help="mqtt://host:1883 or mqtts://host:8883 (default mqtt://127.0.0.1:1883)")
    arg("--topic-prefix", default=None, help="default fedflock/v1")
    arg("--rounds", type=int, default=None, help="rounds of the whole federation (resumes count on; default 20)")
    arg("--clients-per-round", type=int, default=None, help="updates a round wants (default 10)")
    arg("--min-clients", type=int, default=None, help="default 2")
    arg("--min-reports", type=int, default=None, help="default 1")
    arg("--round-timeout", type=float, default=None, help="seconds (default 60)")
    arg("--wait-for-clients", type=float, default=None, help="seconds (default 300)")
    arg("--local-epochs", type=int, default=None, help="default 2")
    arg("--batch-size", type=int, default=None, help="default 16")
    arg("--lr", type=float, default=None, help="default 0.05")
    arg("--seed", type=int, default=None, help="default 0")
    arg("--test-data", type=Path, default=None, help=".npz held-out set for evaluation")
    arg(
        "--hyperparameter",
        action="append",
        default=None,
        metavar="NAME=VALUE[,VALUE...]",
        help="sent in every task, e.g. class_weights=1,5 (a strategy's own, like fedprox_mu, take precedence)",
    )
    arg("--freeze", action="append", default=None, metavar="TENSOR", help="freeze in every task")
    arg(
        "--codecs",
        default=None,
        help="update codecs devices may use, in order of preference (default int8,fp16,fp32; fp32 fp16 int8 "
        "int8-channel int4 int2 sign topk:F topk-int8:F, optional +zstd)",
    )
    arg("--chunk-bytes", type=int, default=None, help="chunk size for large transfers (default 262144)")
    arg(
        "--strategy",
        default=None,
        metavar="NAME",
        help="fedavg (default), fedprox, fedavgm, fedadagrad, fedadam, fedyogi",
    )
    arg(
        "--strategy-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a strategy setting, e.g. server_lr=0.01, mu=0.1, beta1=0.9 (repeatable)",
    )
    arg(
        "--over-selection",
        type=float,
        default=None,
        help="select this many times --clients-per-round devices; a round completes with the first updates",
    )
    arg("--stratify", action="store_true", default=None, help="split each selection across device classes")
    arg("--max-rounds-per-window", type=int, default=None, help="participation budget: rounds per device per window")
    arg("--budget-window", type=float, default=None, metavar="SECONDS", help="the budget's window")
    arg(
        "--robust",
        default=None,
        metavar="RULE[:VALUE]",
        help="Byzantine-robust aggregation: median (coordinate-wise), trimmed_mean:BETA (drop that fraction, "
        "default 0.1, of values at each end), krum:F (Krum tolerating F attackers), clip:NORM (streaming FedAvg "
        "with every update clipped to L2 norm NORM). median, trimmed_mean and krum keep the round's updates in a "
        "buffer of at most max_buffer_mb (default 512), which caps the tasks a round sends",
    )
    arg(
        "--robust-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a robust setting, e.g. max_buffer_mb=256, dtype=float16, m=3 (Multi-Krum), weighted=true (repeatable)",
    )
    arg(
        "--trust",
        action="store_true",
        default=None,
        help="tiered trust: weigh each update by its device's reputation and quarantine a device whose updates "
        "are outliers (3 rounds in a row by default); quarantined devices are not selected",
    )
    arg(
        "--trust-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a trust setting, e.g. quarantine_after=5, outlier_sigma=4, probation_rounds=10 (repeatable)",
    )
    arg(
        "--privacy-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="central differential privacy (docs/privacy.md): a [privacy] key, e.g. epsilon=3, delta=1e-5, "
        "clip_norm=1.0, population=500, noise_multiplier=1.1 (or rounds=30); giving any turns DP on (repeatable)",
    )
    arg(
        "--secagg-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="secure aggregation (docs/secagg.md): a [secagg] key, e.g. clip=0.1, quant_bits=8, threshold=7, "
        "keys_timeout_s=30; giving any turns it on (repeatable)",
    )
    arg("--mode", choices=("sync", "async"), default=None, help="sync rounds (default) or buffered async (FedBuff)")
    arg(
        "--async-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an [asynchronous] setting, e.g. buffer_size=10, max_staleness=8, staleness=hinge (repeatable)",
    )
    arg(
        "--late-updates",
        choices=("drop", "async"),
        default=None,
        help="sync rounds: drop stragglers' late updates (default) or fold them into the next version",
    )
    arg(
        "--store",
        default=None,
        metavar="URL",
        help="durable server state, resumed on restart: sqlite:///path/server.db or postgresql://...",
    )
    arg("--out", type=Path, default=None, help="model files, metrics and plots (default ./fedflock-server)")
    arg(
        "--ops-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics, /api/status, /healthz, /readyz and a dashboard on this port",
    )
    arg("--ops-host", default=None, help="address for --ops-port (default 127.0.0.1; 0.0.0.0 in a container)")
    arg(
        "--role",
        choices=("coordinator", "worker"),
        default=None,
        help="scale-out (docs/scaleout.md): run the rounds (coordinator) or count results from the shared "
        "subscription (worker); needs a postgresql:// --store shared by all",
    )
    arg(
        "--scaleout-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a [scaleout] key, e.g. worker_id=w1, group=fedflock-workers, lease_s=10 (repeatable)",
    )


@dataclass(frozen=True, kw_only=True)
class FlagLayer:
    """What the command line says, split by how it combines with the file."""

    #: table -> key -> value: replaces the file's value of that key
    values: Document = field(default_factory=dict)
    #: tables replaced whole (``--strategy NAME``, ``--robust RULE``)
    tables: Document = field(default_factory=dict)
    #: ``--trust``
    trust: bool = False
    #: table -> key -> value set on top of the resulting table (``--X-option``, ``--hyperparameter``)
    options: Document = field(default_factory=dict)


def resolve_settings(args: argparse.Namespace) -> BrokerSettings:
    """The settings the command line (and its ``--config`` file, if any) describe; ``ConfigError`` if bad."""
    file_doc = read_document(args.config) if args.config is not None else {}
    return build_settings(merge(file_doc, flag_layer(args)))


def flag_layer(args: argparse.Namespace) -> FlagLayer:
    """The flags given on the command line (``None``: not given); relative paths resolve against the cwd."""
    values: Document = {}
    for dest, (table, key) in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.expanduser().resolve())
        elif dest == "store":
            value = resolve_store(value, Path.cwd())
        elif dest == "codecs":
            value = [c for c in value.split(",") if c]
        values.setdefault(table, {})[key] = value
    tables: Document = {}
    if args.strategy is not None:
        tables["strategy"] = {"name": args.strategy}
    if args.robust is not None:
        tables["robust"] = robust_table(args.robust, [])
    options: Document = {}
    for table, items, flag in (
        ("strategy", args.strategy_option, "--strategy-option"),
        ("robust", args.robust_option, "--robust-option"),
        ("trust", args.trust_option, "--trust-option"),
        ("asynchronous", args.async_option, "--async-option"),
        ("privacy", args.privacy_option, "--privacy-option"),
        ("secagg", args.secagg_option, "--secagg-option"),
        ("scaleout", getattr(args, "scaleout_option", None), "--scaleout-option"),
    ):
        if items:
            options[table] = _options(dict(tables.get(table, {})), items, flag)
            for key in tables.get(table, {}):
                del options[table][key]
    if args.hyperparameter:
        options["hyperparameters"] = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in hyperparameters(args.hyperparameter).items()
        }
    return FlagLayer(values=values, tables=tables, trust=bool(args.trust), options=options)


def merge(file_doc: Document, flags: FlagLayer) -> Document:
    """``file_doc`` with ``flags`` applied (module docstring of :mod:`fedflock.broker_config`)."""
    doc = copy.deepcopy(file_doc)
    doc.update(copy.deepcopy(flags.tables))
    for table, values in flags.values.items():
        doc.setdefault(table, {}).update(values)
    if flags.trust:
        doc.setdefault("trust", {})
    for table, values in flags.options.items():
        needs = _OPTION_FLAGS.get(table)
        present = table in doc if table == "trust" else _NEEDS_KEY.get(table, "") in doc.get(table, {})
        if needs is not None and not present:
            raise ConfigError(f"{needs[0]} needs {needs[1]}")
        doc.setdefault(table, {}).update(values)
    return doc


def hyperparameters(items: list[str]) -> dict[str, float | tuple[float, ...]]:
    out: dict[str, float | tuple[float, ...]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--hyperparameter wants NAME=VALUE, got {item!r}")
        try:
            values = floats(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--hyperparameter {name}: {exc}") from exc
        out[name] = values[0] if len(values) == 1 else values
    return out


#: what the value after ``--robust RULE:`` sets, per rule
ROBUST_VALUE_KEYS = {"trimmed_mean": "beta", "krum": "f", "clip": "clip"}


def robust_table(spec: str | None, options: list[str]) -> dict[str, Any]:
    """``--robust RULE[:VALUE]`` and its ``--robust-option KEY=VALUE`` items as a robust table."""
    if spec is None:
        if options:
            raise ConfigError("--robust-option needs --robust RULE")
        return {}
    rule, sep, text = spec.partition(":")
    table: dict[str, Any] = {"rule": rule}
    if sep:
        key = ROBUST_VALUE_KEYS.get(rule)
        if key is None:
            raise ConfigError(f"--robust {rule} takes no value (only {', '.join(ROBUST_VALUE_KEYS)} do), got {spec!r}")
        table[key] = _json_or_text(text)
    return _options(table, options, "--robust-option")


def trust_table(enabled: bool, options: list[str]) -> dict[str, Any] | None:
    """``--trust`` and its ``--trust-option KEY=VALUE`` items (None: trust off)."""
    if not enabled:
        if options:
            raise ConfigError("--trust-option needs --trust")
        return None
    return _options({}, options, "--trust-option")


def strategy_table(name: str | None, options: list[str]) -> dict[str, Any]:
    """``--strategy`` and its ``--strategy-option KEY=VALUE`` items as a strategy config table.

    A value is read as JSON when it is JSON (``0.01``, ``3``, ``true``, ``null``), else kept as text.
    """
    if name is None:
        if options:
            raise ConfigError("--strategy-option needs --strategy NAME")
        return {}
    return _options({"name": name}, options, "--strategy-option")


def _options(table: dict[str, Any], options: list[str], flag: str) -> dict[str, Any]:
    for item in options:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} wants KEY=VALUE, got {item!r}")
        if key in table:
            raise ConfigError(f"{flag} {key} is given twice (or by the flag it belongs to)")
        table[key] = _json_or_text(text)
    return table


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
