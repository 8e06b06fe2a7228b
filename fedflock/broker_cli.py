"""``fedflock broker``: its arguments, parsed once into a :class:`ServerConfig`, and the run.

The federation is durable with ``--store`` (``sqlite:///path/server.db`` or
``postgresql://...``): every accepted update is committed, and the same command run again after
a crash or a restart resumes the federation (the open round continues until its deadline, the
round numbering goes on, and ``--rounds`` counts the rounds of the whole federation).

``--robust RULE[:VALUE]`` chooses Byzantine-robust aggregation (``median``,
``trimmed_mean:BETA``, ``krum:F``, ``clip:NORM``; more settings with ``--robust-option``) and
``--trust`` turns tiered trust on (``--trust-option`` sets its fields); see
:mod:`broker_server.robust_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ConfigError
from fedflock.export_options import floats

if TYPE_CHECKING:
    from broker_server.ops import ServerMetrics
    from broker_server.server_config import ServerConfig


def add_broker_arguments(broker: argparse.ArgumentParser) -> None:
    broker.add_argument("--bundle", type=Path, required=True)
    broker.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    broker.add_argument("--topic-prefix", default="fedflock/v1")
    broker.add_argument("--rounds", type=int, default=20, help="rounds of the whole federation (resumes count on)")
    broker.add_argument("--clients-per-round", type=int, default=10, help="updates a round wants")
    broker.add_argument("--min-clients", type=int, default=2)
    broker.add_argument("--min-reports", type=int, default=1)
    broker.add_argument("--round-timeout", type=float, default=60.0, help="seconds")
    broker.add_argument("--wait-for-clients", type=float, default=300.0, help="seconds")
    broker.add_argument("--local-epochs", type=int, default=2)
    broker.add_argument("--batch-size", type=int, default=16)
    broker.add_argument("--lr", type=float, default=0.05)
    broker.add_argument("--seed", type=int, default=0)
    broker.add_argument("--test-data", type=Path, default=None, help=".npz held-out set for evaluation")
    broker.add_argument(
        "--hyperparameter",
        action="append",
        default=[],
        metavar="NAME=VALUE[,VALUE...]",
        help="sent in every task, e.g. class_weights=1,5 (a strategy's own, like fedprox_mu, take precedence)",
    )
    broker.add_argument("--freeze", action="append", default=[], metavar="TENSOR", help="freeze in every task")
    broker.add_argument(
        "--codecs",
        default="int8,fp16,fp32",
        help="update codecs devices may use, in order of preference (fp32 fp16 int8 int8-channel int4 int2 "
        "sign topk:F topk-int8:F, optional +zstd)",
    )
    broker.add_argument("--chunk-bytes", type=int, default=256 * 1024, help="chunk size for large transfers")
    broker.add_argument(
        "--strategy",
        default=None,
        metavar="NAME",
        help="server strategy: fedavg (default), fedprox, fedavgm, fedadagrad, fedadam, fedyogi",
    )
    broker.add_argument(
        "--strategy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy setting, e.g. server_lr=0.01, mu=0.1, beta1=0.9 (repeatable)",
    )
    broker.add_argument(
        "--over-selection",
        type=float,
        default=1.0,
        help="select this many times --clients-per-round devices; a round completes with the first updates",
    )
    broker.add_argument("--stratify", action="store_true", help="split each selection across device classes")
    broker.add_argument(
        "--max-rounds-per-window", type=int, default=None, help="participation budget: rounds per device per window"
    )
    broker.add_argument("--budget-window", type=float, default=None, metavar="SECONDS", help="the budget's window")
    broker.add_argument(
        "--robust",
        default=None,
        metavar="RULE[:VALUE]",
        help="Byzantine-robust aggregation: median (coordinate-wise), trimmed_mean:BETA (drop that fraction, "
        "default 0.1, of values at each end), krum:F (Krum tolerating F attackers), clip:NORM (streaming FedAvg "
        "with every update clipped to L2 norm NORM). median, trimmed_mean and krum keep the round's updates in a "
        "buffer of at most max_buffer_mb (default 512), which caps the tasks a round sends",
    )
    broker.add_argument(
        "--robust-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a robust setting, e.g. max_buffer_mb=256, dtype=float16, m=3 (Multi-Krum), weighted=true (repeatable)",
    )
    broker.add_argument(
        "--trust",
        action="store_true",
        help="tiered trust: weigh each update by its device's reputation and quarantine a device whose updates "
        "are outliers (3 rounds in a row by default); quarantined devices are not selected",
    )
    broker.add_argument(
        "--trust-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trust setting, e.g. quarantine_after=5, outlier_sigma=4, probation_rounds=10 (repeatable)",
    )
    broker.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="durable server state, resumed on restart: sqlite:///path/server.db or postgresql://...",
    )
    broker.add_argument("--out", type=Path, default=Path("fedflock-server"), help="model files, metrics and plots")
    broker.add_argument(
        "--ops-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics, /api/status, /healthz, /readyz and a dashboard on this port",
    )
    broker.add_argument("--ops-host", default="127.0.0.1", help="address for --ops-port (0.0.0.0 in a container)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` the parsed arguments describe (``ConfigError`` if they do not)."""
    from broker_server.server_config import ServerConfig
    from edge_agent.protocol.topics import Topics

    return ServerConfig(
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        min_clients=args.min_clients,
        min_reports=args.min_reports,
        round_timeout_s=args.round_timeout,
        wait_for_clients_s=args.wait_for_clients,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        topics=Topics(args.topic_prefix),
        hyperparameters=hyperparameters(args.hyperparameter),
        frozen=tuple(args.freeze),
        codecs=tuple(c for c in args.codecs.split(",") if c),
        chunk_bytes=args.chunk_bytes,
        strategy=strategy_table(args.strategy, args.strategy_option),
        over_selection=args.over_selection,
        stratify=args.stratify,
        max_rounds_per_window=args.max_rounds_per_window,
        budget_window_s=args.budget_window,
        robust=robust_table(args.robust, args.robust_option),
        trust=trust_table(args.trust, args.trust_option),
    )


def run_broker(args: argparse.Namespace) -> int:
    from broker_server.ops import MeteredTransport, ServerMetrics
    from broker_server.persistence import open_server_store
    from broker_server.server import FederatedServer
    from edge_agent.data import load_npz
    from edge_agent.runtime.bundle import Bundle
    from edge_agent.runtime.trainer import EvalResult, OrtTrainer
    from fedflock.report import write_metrics
    from fedflock.wiring import server_transport

    config = server_config(args)
    bundle = Bundle.open(args.bundle)
    evaluator = None
    if args.test_data is not None:
        test, trainer = load_npz(args.test_data), OrtTrainer.open(bundle, threads=2)

        def evaluator(weights: dict[str, Any]) -> EvalResult:
            return trainer.evaluate(weights, test.x, test.y)

    store = open_server_store(args.store) if args.store is not None else None
    metrics = ServerMetrics()
    try:
        client_id = f"fedflock-server-{uuid.uuid4().hex[:8]}"
        transport = MeteredTransport(server_transport(args.mqtt_url, client_id), metrics)
        server = FederatedServer(transport, bundle, config, out_dir=args.out, evaluator=evaluator, store=store)
        started = threading.Event()
        with operations_endpoint(args, server, metrics, started):
            server.start()
            started.set()
            metrics.set_model_version(server.model_version)
            try:
                results = server.run(on_round=lambda result: observe_round(server, metrics, result))
            finally:
                server.close()
    finally:
        if store is not None:
            store.close()
    args.out.mkdir(parents=True, exist_ok=True)
    write_metrics(args.out, results, baseline=server.baseline)
    print(f"{sum(r.completed for r in results)}/{len(results)} rounds completed; metrics in {args.out}")
    return 0


def observe_round(server: Any, metrics: ServerMetrics, result: Any) -> None:
    metrics.round_finished(result)
    metrics.set_model_version(server.model_version)
    records = server.registry.records()
    metrics.devices(sum(r.online for r in records), len(records))


def operations_endpoint(
    args: argparse.Namespace, server: Any, metrics: ServerMetrics, started: threading.Event
) -> contextlib.AbstractContextManager[Any]:
    """``--ops-port``: Prometheus /metrics, /api/status, /healthz, /readyz and the dashboard."""
    if args.ops_port is None:
        return contextlib.nullcontext()
    from broker_server.ops import OpsServer, build_status

    def status() -> dict[str, Any]:
        return build_status(
            config=server.config,
            strategy=server.strategy.name,
            model_version=server.model_version,
            bundle_digest=server.bundle.digest,
            devices=server.registry.records(),
            rounds=list(server.results),
            now=time.monotonic(),
        )

    return OpsServer(args.ops_host, args.ops_port, metrics=metrics, status=status, ready=started.is_set)


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


def strategy_table(name: str | None, options: list[str]) -> dict[str, Any]:
    """``--strategy`` and its ``--strategy-option KEY=VALUE`` items as a strategy config table.

    A value is read as JSON when it is JSON (``0.01``, ``3``, ``true``, ``null``), else kept as text.
    """
    if name is None:
        if options:
            raise ConfigError("--strategy-option needs --strategy NAME")
        return {}
    table: dict[str, Any] = {"name": name}
    for item in options:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--strategy-option wants KEY=VALUE, got {item!r}")
        if key in table:
            raise ConfigError(f"--strategy-option {key} is given twice (or names the strategy)")
        try:
            table[key] = json.loads(text)
        except ValueError:
            table[key] = text
    return table
