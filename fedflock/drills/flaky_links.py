"""Drill: every device reaches the broker through a fault-injecting proxy (drops, cuts mid-packet,
delays, blackholes, muted acknowledgements), with a seeded plan.

``devices`` real ``fedflock agent`` processes connect through one
:class:`~fedflock.drills.proxy.FaultProxy`; the server (in-process, SQLite store) connects to
Mosquitto directly. The plan (:func:`~fedflock.drills.plans.seeded_plan`) gives the first
``faulty_connections`` connections a fault with probability ``fault_rate``; ``cut``,
``blackhole`` and ``mute`` fire on the UPDATE's PUBLISH (the bytes ``/results``). Later
connections are clean, so every device gets through in the end. After ``rounds`` rounds every
update must be in the server's store exactly once.

``cut_between_rounds=True`` also cuts every link right after each round, so the next round's
TASKs meet devices that are reconnecting. Before the round engine sent TASKs again after a
device's reconnect (broker_server.task_resend) that round lost every TASK and was abandoned at
its deadline (docs/drills.md, "Found by the drills").
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.runtime.bundle import Bundle
from fedflock.drills.fleet import AgentFleet
from fedflock.drills.plans import seeded_plan
from fedflock.drills.proxy import FaultProxy
from fedflock.drills.report import DrillReport, check_exactly_once
from fedflock.drills.server import DrillServer, LogCounter, drill_config

__all__ = ["flaky_links_drill"]

TRIGGER = b"/results"


def flaky_links_drill(
    work: Path,
    broker: MosquittoProcess,
    bundle: Bundle,
    *,
    devices: int = 3,
    rounds: int = 2,
    seed: int = 8,
    faulty_connections: int = 12,
    fault_rate: float = 0.7,
    max_blackhole_s: float = 2.0,
    cut_between_rounds: bool = False,
) -> DrillReport:
    began = time.monotonic()
    prefix = f"drill-flaky-{uuid.uuid4().hex[:8]}/v1"
    plan = seeded_plan(
        seed, faulty_connections, trigger=TRIGGER, fault_rate=fault_rate, max_blackhole_s=max_blackhole_s
    )
    proxy = FaultProxy((broker.host, broker.port), plan)
    proxy.start()
    fleet = AgentFleet(work, bundle, url=proxy.url, prefix=prefix, count=devices, name="flaky", seed=seed)
    config = drill_config(devices=devices, rounds=rounds, prefix=prefix, round_timeout_s=90)
    server = DrillServer(broker.host, broker.port, bundle, config, work / "server.db", client_id=f"{prefix}-server")
    counter = LogCounter("duplicate", "(replayed)")
    logging.getLogger("fedflock.server").addHandler(counter)
    round_s: list[float] = []
    try:
        server.start()
        fleet.start(online_timeout=60)
        for number in range(1, rounds + 1):
            started = time.monotonic()
            server.start_round(number)
            result = server.finish_round(120)
            if not result.completed:
                raise AssertionError(f"round {number} did not complete: {result.reason}\n{fleet.logs()}")
            round_s.append(time.monotonic() - started)
            if cut_between_rounds and number < rounds:
                proxy.cut_all()  # every agent reconnects: the next connections meet the plan's next faults
        ledgers = server.ledger(range(1, rounds + 1))
        logs = fleet.logs()
    finally:
        logging.getLogger("fedflock.server").removeHandler(counter)
        fleet.close()
        server.close()
        proxy.close()
    stats = proxy.stats()
    check = check_exactly_once(ledgers, fleet.examples)
    return DrillReport.of(
        "fault-injecting TCP proxy",
        check,
        devices=devices,
        rounds=rounds,
        faults=stats.faults_fired,
        recover_s=max(round_s),
        reconnects=logs.count("lost its connection"),
        retransmits=fleet.retransmits(),
        duplicates_refused=sum(counter.counts.values()),
        wall_s=time.monotonic() - began,
        notes=f"seed {seed}: {plan.injected} of {faulty_connections} connections faulted",
        extra={"cuts": stats.cuts, "connections": stats.connections, "fired": stats.fired},
    )
