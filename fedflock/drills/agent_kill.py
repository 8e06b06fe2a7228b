"""Drill: ``fedflock agent`` SIGKILLed between publishing its UPDATE and recording the acknowledgement.

Every round, every device is killed ``kills`` times on the same update, two ways in turn:

* odd rounds, **after the PUBACK**: the agents run with the crash hook
  (``FEDFLOCK_DRILL_CRASH=after-result-publish``) and SIGKILL themselves right after the broker
  acknowledged the UPDATE, before the outbox marks it delivered; restarted with the hook, each
  re-sends (the next attempt) and dies again, ``kills`` times in all;
* even rounds, **before the PUBACK**: the agents reach the broker through a
  :class:`~fedflock.drills.proxy.FaultProxy` that mutes the broker's answer to the UPDATE, and
  the drill SIGKILLs each agent once the server has committed its update (the agent is still
  waiting for the PUBACK); then ``kills - 1`` hook kills as above.

Then the agents restart cleanly, re-send once more and record the delivery. The server must
have accepted every update exactly once (the first copy), refusing every re-send.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.runtime.bundle import Bundle
from fedflock.drills.crash import CRASH_ENV
from fedflock.drills.fleet import AgentFleet
from fedflock.drills.plans import Fault, FaultPlan
from fedflock.drills.processes import wait_for
from fedflock.drills.proxy import FaultProxy
from fedflock.drills.report import DrillReport, check_exactly_once
from fedflock.drills.server import DrillServer, LogCounter, drill_config

__all__ = ["agent_kill_drill"]

HOOK = {CRASH_ENV: "after-result-publish"}


def agent_kill_drill(
    work: Path, broker: MosquittoProcess, bundle: Bundle, *, devices: int = 1, rounds: int = 2, kills: int = 2
) -> DrillReport:
    """Run the drill in ``work``; its report (the caller asserts on it)."""
    began = time.monotonic()
    prefix = f"drill-kill-{uuid.uuid4().hex[:8]}/v1"
    fleet = AgentFleet(work, bundle, url=broker.url, prefix=prefix, count=devices, name="kill")
    config = drill_config(devices=devices, rounds=rounds, prefix=prefix, round_timeout_s=120)
    server = DrillServer(broker.host, broker.port, bundle, config, work / "server.db", client_id=f"{prefix}-server")
    counter = LogCounter("duplicate", "(replayed)")
    logging.getLogger("fedflock.server").addHandler(counter)
    recover: list[float] = []
    proxy = FaultProxy((broker.host, broker.port))
    try:
        server.start()
        for number in range(1, rounds + 1):
            recover.append(_one_round(number, fleet, server, proxy, broker, kills))
        ledgers = server.ledger(range(1, rounds + 1))
    finally:
        logging.getLogger("fedflock.server").removeHandler(counter)
        fleet.close()
        server.close()
        proxy.close()
    check = check_exactly_once(ledgers, fleet.examples)
    return DrillReport.of(
        "agent SIGKILL between publish and ack",
        check,
        devices=devices,
        rounds=rounds,
        faults=sum(p.kills for p in fleet.processes) + _hook_kills(fleet),
        recover_s=max(recover),
        reconnects=sum(p.starts for p in fleet.processes) - devices,
        retransmits=fleet.retransmits(),
        duplicates_refused=sum(counter.counts.values()),
        wall_s=time.monotonic() - began,
        notes=f"{kills} kills per update; odd rounds after the PUBACK (hook), even rounds before it (proxy)",
        extra={"resent_accepted": check.resent_accepted},
    )


def _hook_kills(fleet: AgentFleet) -> int:
    return sum(p.output().count(f"{CRASH_ENV}: killing") for p in fleet.processes)


def _one_round(
    number: int, fleet: AgentFleet, server: DrillServer, proxy: FaultProxy, broker: MosquittoProcess, kills: int
) -> float:
    """One round with its kills; seconds from the last kill to every update recorded delivered."""
    before_puback = number % 2 == 0
    if before_puback:
        if not proxy.port:
            proxy.plan = FaultPlan(tuple(Fault(kind="mute", trigger=b"/results", seconds=120) for _ in range(99)))
            proxy.start()
        fleet.point_at(proxy.url)
        fleet.start()
    else:
        fleet.start(env=HOOK)
    server.start_round(number)
    wait_for(lambda: server.accepted(number) >= len(fleet.device_ids), 60, f"round {number}'s updates")
    if before_puback:
        for process in fleet.processes:
            process.kill()  # still waiting for the muted PUBACK
        fleet.point_at(broker.url)
        proxy.cut_all()
        remaining = kills - 1
    else:
        fleet.wait_exited(30)
        remaining = kills - 1
    for _ in range(remaining):
        fleet.start(env=HOOK)
        fleet.wait_exited(30)
    last_kill = time.monotonic()
    fleet.start()
    result = server.finish_round(60)
    if not result.completed:
        raise AssertionError(f"round {number} did not complete: {result.reason}")
    [ledger] = server.ledger([number])
    wait_for(lambda: fleet.delivered(set(ledger.tasks)), 30, f"round {number}'s results to be recorded delivered")
    took = time.monotonic() - last_kill
    fleet.terminate()  # the next round starts its agents with or without the hook
    return took
