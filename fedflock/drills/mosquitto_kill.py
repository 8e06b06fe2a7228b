"""Drill: Mosquitto SIGKILLed mid-round and restarted with persistence.

A Mosquitto with ``persistence true`` (saved every second) carries ``devices`` real
``fedflock agent`` processes and an in-process server with a SQLite store. Half the devices
(the *slow* ones) reach the broker through a :class:`~fedflock.drills.proxy.FaultProxy` that
delays every chunk they send, so when the first fast update is committed the round is
mid-way: the drill then SIGKILLs Mosquitto (no save on exit), keeps it down ``down_s`` seconds
and starts it again on the same port from its persistence file. Every agent must reconnect
and deliver, the round must complete, and the server's store must hold every update once.
Repeated ``rounds`` times (one kill per round).
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.runtime.bundle import Bundle
from fedflock.drills.fleet import AgentFleet
from fedflock.drills.plans import Fault, FaultPlan
from fedflock.drills.processes import wait_for
from fedflock.drills.proxy import FaultProxy
from fedflock.drills.report import DrillReport, check_exactly_once
from fedflock.drills.server import DrillServer, drill_config

__all__ = ["mosquitto_kill_drill"]


def mosquitto_kill_drill(
    work: Path,
    bundle: Bundle,
    *,
    devices: int = 4,
    rounds: int = 1,
    down_s: float = 1.0,
    slow_delay_s: float = 1.5,
) -> DrillReport:
    began = time.monotonic()
    broker = MosquittoProcess(work / "mosquitto", persistence_dir=work / "mosquitto" / "db", autosave_interval=1)
    broker.start()
    prefix = f"drill-mq-{uuid.uuid4().hex[:8]}/v1"
    # every connection through the proxy is slow: the slow devices' UPDATEs are still on their way
    slow = FaultProxy(
        (broker.host, broker.port), FaultPlan(tuple(Fault(kind="delay", delay_s=slow_delay_s) for _ in range(10_000)))
    )
    slow.start()
    fleet = AgentFleet(work, bundle, url=broker.url, prefix=prefix, count=devices, name="mq")
    half = devices // 2
    for spec_index in range(half, devices):  # the second half connects through the slow proxy
        fleet.point_one(spec_index, slow.url)
    config = drill_config(devices=devices, rounds=rounds, prefix=prefix, round_timeout_s=90)
    server = DrillServer(broker.host, broker.port, bundle, config, work / "server.db", client_id=f"{prefix}-server")
    recover: list[float] = []
    accepted_before: list[int] = []
    try:
        server.start()
        fleet.start(online_timeout=60)
        for number in range(1, rounds + 1):
            server.start_round(number)
            wait_for(partial(server.has_accepted, number), 60, f"round {number}'s first update")
            accepted_before.append(server.accepted(number))
            broker.kill()
            time.sleep(down_s)
            broker.start()
            restarted = time.monotonic()
            result = server.finish_round(120)
            if not result.completed:
                raise AssertionError(f"round {number} did not complete: {result.reason}\n{fleet.logs()}")
            recover.append(time.monotonic() - restarted)
        ledgers = server.ledger(range(1, rounds + 1))
        logs = fleet.logs()
    finally:
        fleet.close()
        server.close()
        slow.close()
        broker.stop()
    check = check_exactly_once(ledgers, fleet.examples)
    return DrillReport.of(
        "Mosquitto SIGKILL + restart (persistence)",
        check,
        devices=devices,
        rounds=rounds,
        faults=rounds,
        recover_s=max(recover),
        reconnects=logs.count("lost its connection"),
        retransmits=fleet.retransmits(),
        wall_s=time.monotonic() - began,
        notes=f"broker down {down_s:.1f}s per kill; {devices - half} devices behind a {slow_delay_s:.1f}s-delay link",
        extra={"accepted_before_kill": accepted_before, "resent_accepted": check.resent_accepted},
    )
