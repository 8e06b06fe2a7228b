"""``fedflock broker --role coordinator|worker``: one process of a scale-out federation (docs/scaleout.md).

Every process of the federation runs with the same settings (the same ``broker.toml``): the
coordinator runs the rounds, each worker counts its share of the device results. The
``[scaleout]`` table (or ``--scaleout-option KEY=VALUE``) tunes it; a worker's name defaults to
``<hostname>-<pid>`` (``worker_id``). Settings scale-out cannot run are refused before anything
connects (:func:`broker_server.scaleout.check_scaleout`, naming the key). A worker stops cleanly
on SIGTERM or SIGINT: it flushes its partials and leaves.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from fedflock.broker_config import BrokerSettings, read_document
from fedflock.broker_flags import flag_layer, merge

if TYPE_CHECKING:
    from broker_server.persistence import PostgresServerStore
    from broker_server.scaleout import ScaleoutSettings
    from edge_agent.runtime.bundle import Bundle

__all__ = ["run_scaleout", "scaleout_table", "scaleout_to_print"]

log = logging.getLogger("fedflock.scaleout")


def scaleout_table(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``[scaleout]`` table of the file, with ``--scaleout-option`` items on top."""
    file_doc = read_document(args.config) if args.config is not None else {}
    return merge(file_doc, flag_layer(args)).get("scaleout")


def scaleout_to_print(args: argparse.Namespace) -> ScaleoutSettings | None:
    """The resolved ``[scaleout]`` settings for ``--print-config``: None unless scale-out is
    configured (a ``[scaleout]`` table, ``--scaleout-option`` or ``--role``); ``ConfigError``
    naming a bad key."""
    from broker_server.scaleout import parse_scaleout

    table = scaleout_table(args)
    if table is None and getattr(args, "role", None) is None:
        return None
    return parse_scaleout(table)


def run_scaleout(args: argparse.Namespace, settings: BrokerSettings) -> int:
    from broker_server.persistence import PostgresServerStore, open_server_store
    from broker_server.scaleout import check_scaleout, parse_scaleout
    from edge_agent.runtime.bundle import Bundle

    scaleout = parse_scaleout(scaleout_table(args))
    check_scaleout(settings.server, settings.store)
    assert settings.store is not None  # check_scaleout refused anything but a postgresql:// store
    bundle = Bundle.open(settings.bundle)
    store = open_server_store(settings.store)
    try:
        assert isinstance(store, PostgresServerStore)
        if args.role == "coordinator":
            return _coordinate(settings, scaleout, bundle, store)
        return _work(settings, scaleout, bundle, store)
    finally:
        store.close()


def _coordinate(
    settings: BrokerSettings, scaleout: ScaleoutSettings, bundle: Bundle, store: PostgresServerStore
) -> int:
    from broker_server.scaleout import ScaleoutCoordinator
    from edge_agent.data import load_npz
    from edge_agent.runtime.trainer import EvalResult, OrtTrainer
    from fedflock.report import write_metrics
    from fedflock.wiring import configured_server_transport

    evaluator = None
    if settings.test_data is not None:
        test, trainer = load_npz(settings.test_data), OrtTrainer.open(bundle, threads=2)

        def evaluator(weights: dict[str, Any]) -> EvalResult:
            return trainer.evaluate(weights, test.x, test.y)

    client_id = settings.client_id or f"fedflock-coordinator-{uuid.uuid4().hex[:8]}"
    coordinator = ScaleoutCoordinator(
        configured_server_transport(settings.mqtt, client_id),
        bundle,
        settings.server,
        store=store,
        settings=scaleout,
        evaluator=evaluator,
        out_dir=settings.out,
    )
    coordinator.start()
    try:
        results = coordinator.run()
    finally:
        coordinator.close()
    settings.out.mkdir(parents=True, exist_ok=True)
    write_metrics(settings.out, results)
    print(
        f"{sum(r.completed for r in results)}/{len(results)} rounds completed; {len(coordinator.fenced)} workers "
        f"fenced, {coordinator.resent} TASKs re-sent; metrics in {settings.out}"
    )
    return 0


def _work(settings: BrokerSettings, scaleout: ScaleoutSettings, bundle: Bundle, store: PostgresServerStore) -> int:
    from broker_server.persistence.scaleout import ScaleoutLedger
    from broker_server.scaleout import ScaleoutWorker
    from fedflock.wiring import configured_server_transport

    base = settings.client_id or "fedflock-worker"
    worker = ScaleoutWorker(
        configured_server_transport(settings.mqtt, f"{base}-{uuid.uuid4().hex[:8]}"),
        bundle.manifest.aggregated_tensors,
        store=store,
        ledger=ScaleoutLedger(store, clock=time.time),
        settings=scaleout,
        topics=settings.server.topics,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.start()
    worker.run(stop)
    print(
        f"worker {worker.session}: {worker.accepted} updates counted, {worker.duplicates} duplicates "
        f"({worker.claim_conflicts} counted by other workers), {worker.late} late, {worker.flushes} flushes, "
        f"{len(worker.rejections)} rejected"
    )
    return 0
