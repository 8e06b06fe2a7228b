"""``fedflock broker``: its settings, resolved once into :class:`BrokerSettings`, and the run.

Settings come from flags, from ``--config broker.toml``, or both: the file first, then every flag
given on the command line overrides the key it names (:mod:`fedflock.broker_config` has the
rule and the file's tables, :mod:`fedflock.broker_flags` the flags). ``--print-config`` prints
the resolved settings as TOML (:mod:`fedflock.broker_toml`) and exits without connecting.

The federation is durable with ``--store`` / ``[server] store`` (``sqlite:///path/server.db`` or
``postgresql://...``): every accepted update is committed, and the same command run again after
a crash or a restart resumes the federation (the open round continues until its deadline, the
round numbering goes on, and ``rounds`` counts the rounds of the whole federation).

``--robust RULE[:VALUE]`` / ``[robust]`` chooses Byzantine-robust aggregation and ``--trust`` /
``[trust]`` turns tiered trust on; see :mod:`broker_server.robust_config`. ``--privacy-option`` /
``[privacy]`` turns central differential privacy on (docs/privacy.md): the run ends, exit code 0,
when the next round would pass the ε budget, and prints the ε spent. The server reaches a
TLS or password-protected broker with the ``[mqtt]`` table (``mqtts://`` url, ``ca_file``,
``cert_file``/``key_file``, ``username``/``password_file``): these exist only in the file, as for
the agent, so no secret path has two sources.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedflock.broker_config import BrokerSettings
from fedflock.broker_flags import (
    add_broker_arguments,
    hyperparameters,
    resolve_settings,
    robust_table,
    strategy_table,
    trust_table,
)

if TYPE_CHECKING:
    from broker_server.ops import ServerMetrics
    from broker_server.server_config import ServerConfig
    from edge_agent.transport.base import Transport

__all__ = [
    "add_broker_arguments",
    "hyperparameters",
    "operations_endpoint",
    "robust_table",
    "run_broker",
    "server_config",
    "strategy_table",
    "trust_table",
]


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` the parsed arguments describe (``ConfigError`` if they do not)."""
    return resolve_settings(args).server


def run_broker(args: argparse.Namespace) -> int:
    """``fedflock broker``: resolve the settings (or print them with ``--print-config``), then run."""
    settings = resolve_settings(args)
    if getattr(args, "role", None) is not None and not args.print_config:
        from fedflock.broker_scaleout import run_scaleout

        return run_scaleout(args, settings)
    if args.print_config:
        from fedflock.broker_scaleout import scaleout_to_print
        from fedflock.broker_toml import render_settings

        print(render_settings(settings, scaleout_to_print(args)), end="")
        return 0
    return run_server(settings)


def run_server(settings: BrokerSettings) -> int:
    """Run the federation ``settings`` describe until its last round; write its metrics."""
    from broker_server.ops import MeteredTransport, ServerMetrics
    from broker_server.persistence import open_server_store
    from broker_server.server import FederatedServer
    from edge_agent.data import load_npz
    from edge_agent.runtime.bundle import Bundle
    from edge_agent.runtime.trainer import EvalResult, OrtTrainer
    from fedflock.report import write_metrics
    from fedflock.wiring import configured_server_transport

    config = settings.server
    bundle = Bundle.open(settings.bundle)
    evaluator = None
    if settings.test_data is not None:
        test, trainer = load_npz(settings.test_data), OrtTrainer.open(bundle, threads=2)

        def evaluator(weights: dict[str, Any]) -> EvalResult:
            return trainer.evaluate(weights, test.x, test.y)

    store = open_server_store(settings.store) if settings.store is not None else None
    metrics = ServerMetrics()
    try:
        client_id = settings.client_id or f"fedflock-server-{uuid.uuid4().hex[:8]}"
        link = configured_server_transport(settings.mqtt, client_id)
        transport: Transport = MeteredTransport(link, metrics)
        signer = None
        if settings.signing_key is not None:  # every MODEL announcement signed (docs/security.md)
            from broker_server.pki.release_signer import ReleaseSigner
            from broker_server.pki.statement_refresh import StatementRefresher

            signer = ReleaseSigner.from_file(settings.signing_key, lifetime_s=settings.statement_lifetime_s)
            if signer.lifetime_s is not None:  # retained statements are re-signed before they expire
                transport = StatementRefresher(transport, signer)
        server = FederatedServer(
            transport, bundle, config, out_dir=settings.out, evaluator=evaluator, store=store, events=metrics
        )
        if signer is not None:
            server.publisher.sign_with(signer.sign)
        started = threading.Event()
        # ready: started, and connected to the broker now (a lost link turns /readyz to 503 until
        # the transport has reconnected)
        with operations_endpoint(settings, server, metrics, lambda: started.is_set() and link.is_connected()):
            server.start()
            started.set()
            metrics.set_model_version(server.model_version)
            observe_privacy(server, metrics)
            try:
                results = server.run(on_round=lambda result: observe_round(server, metrics, result))
            finally:
                server.close()
    finally:
        if store is not None:
            store.close()
    settings.out.mkdir(parents=True, exist_ok=True)
    write_metrics(settings.out, results, baseline=server.baseline)
    print(f"{sum(r.completed for r in results)}/{len(results)} rounds completed; metrics in {settings.out}")
    if (privacy := server.privacy) is not None:
        ended = f"; {server.stopped}" if server.stopped else ""
        print(
            f"central DP: ε={privacy['epsilon_spent']:.4f} spent of {privacy['epsilon_budget']:g} "
            f"(δ={privacy['delta']:g}, {privacy['rounds_charged']} rounds charged){ended}"
        )
    return 0


def observe_round(server: Any, metrics: ServerMetrics, result: Any) -> None:
    metrics.round_finished(result)
    if result.aggregation_s is not None:
        metrics.aggregation_took(result.aggregation_s)
    metrics.set_model_version(server.model_version)
    records = server.registry.records()
    metrics.devices(sum(r.online for r in records), len(records))
    reputation = server.reputation
    metrics.trust_observed(server.trust_events, len(reputation.quarantined) if reputation is not None else 0)
    metrics.robust_observed(server.robust_round)
    observe_privacy(server, metrics)


def observe_privacy(server: Any, metrics: ServerMetrics) -> None:
    """Central DP's ε spent and budget as gauges (nothing when DP is off)."""
    privacy = server.privacy
    if privacy is not None:
        metrics.privacy_observed(privacy["epsilon_spent"], privacy["epsilon_budget"])


def operations_endpoint(
    settings: BrokerSettings, server: Any, metrics: ServerMetrics, ready: Callable[[], bool]
) -> contextlib.AbstractContextManager[Any]:
    """``[ops] port``: Prometheus /metrics, /api/status, /healthz, /readyz and the dashboard."""
    if settings.ops.port is None:
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
            reputation=server.reputation,
            trust_events=list(server.trust_events),
            rollout=server.publisher.rollout.state if server.publisher.rollout is not None else None,
            rollout_now=time.time(),  # the rollout runs on the server's wall clock
            clusters=server.cluster_status(),
            privacy=server.privacy,
        )

    return OpsServer(settings.ops.host, settings.ops.port, metrics=metrics, status=status, ready=ready)
