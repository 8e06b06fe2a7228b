"""Drill: the ``fedflock broker`` process SIGKILLed mid-round and restarted on its store.

``devices`` real ``fedflock agent`` processes, half of them behind a slow link (a delaying
:class:`~fedflock.drills.proxy.FaultProxy`), train for a ``fedflock broker --store sqlite:///...``
process. In every round, once the store shows the first update committed, the server gets
SIGKILL; the slow devices' updates then reach Mosquitto while no server listens (lost with
it). The same command started again resumes the round from the store, re-sends the TASKs of the
devices it has no update from, and those answer from their outboxes. Every update must be in the
store exactly once.
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.persistence import SqliteServerStore
from edge_agent.runtime.bundle import Bundle
from fedflock.drills.fleet import AgentFleet
from fedflock.drills.plans import Fault, FaultPlan
from fedflock.drills.processes import FedflockProcess, wait_for
from fedflock.drills.proxy import FaultProxy
from fedflock.drills.report import DrillReport, check_exactly_once, read_ledger

__all__ = ["broker_command", "server_kill_drill"]


def broker_command(url: str, bundle: Bundle, work: Path, prefix: str, *, devices: int, rounds: int) -> list[str]:
    """``fedflock broker`` arguments of the drill (sync FedAvg, fp32, SQLite store in ``work``)."""
    return [
        "broker",
        *("--bundle", str(bundle.directory), "--mqtt-url", url, "--topic-prefix", prefix),
        *("--rounds", str(rounds), "--clients-per-round", str(devices), "--min-clients", str(devices)),
        *("--min-reports", str(devices), "--round-timeout", "120", "--wait-for-clients", "60"),
        *("--local-epochs", "1", "--batch-size", "8", "--codecs", "fp32"),
        *("--store", f"sqlite:///{work / 'server.db'}", "--out", str(work / "out")),
    ]


def _stored(db: Path, number: int) -> tuple[int, str]:
    """(updates committed, status) of round ``number`` in the store; (0, "") before it exists."""
    if not db.exists():
        return 0, ""
    store = SqliteServerStore.open(db)
    try:
        if (store.last_round() or 0) < number:
            return 0, ""
        snapshot = store.load_round(number)
        return len(snapshot.accepted), snapshot.round.status
    finally:
        store.close()


def _committed(db: Path, number: int) -> bool:
    return _stored(db, number)[0] >= 1


def _completed(db: Path, number: int) -> bool:
    return _stored(db, number)[1] == "completed"


def server_kill_drill(
    work: Path,
    broker: MosquittoProcess,
    bundle: Bundle,
    *,
    devices: int = 4,
    rounds: int = 1,
    slow_delay_s: float = 1.5,
) -> DrillReport:
    began = time.monotonic()
    prefix = f"drill-srv-{uuid.uuid4().hex[:8]}/v1"
    db = work / "server.db"
    slow = FaultProxy(
        (broker.host, broker.port), FaultPlan(tuple(Fault(kind="delay", delay_s=slow_delay_s) for _ in range(10_000)))
    )
    slow.start()
    fleet = AgentFleet(work, bundle, url=broker.url, prefix=prefix, count=devices, name="srv")
    for index in range(devices // 2, devices):
        fleet.point_one(index, slow.url)
    server = FedflockProcess(
        broker_command(broker.url, bundle, work, prefix, devices=devices, rounds=rounds), work / "broker.log"
    )
    recover: list[float] = []
    before: list[int] = []
    try:
        fleet.start(online_timeout=60)
        server.start()
        for number in range(1, rounds + 1):
            wait_for(partial(_committed, db, number), 90, f"round {number}'s first committed update")
            server.kill()
            before.append(_stored(db, number)[0])
            time.sleep(slow_delay_s + 1.0)  # the slow devices deliver to a broker with no server
            server.start()
            restarted = time.monotonic()
            wait_for(partial(_completed, db, number), 120, f"round {number} to complete")
            recover.append(time.monotonic() - restarted)
        code = server.wait(60)
        if code != 0:
            raise AssertionError(f"fedflock broker exited with {code}:\n{server.output()}")
        store = SqliteServerStore.open(db)
        try:
            ledgers = read_ledger(store, range(1, rounds + 1))
        finally:
            store.close()
        output = server.output()
    finally:
        fleet.close()
        server.close()
        slow.close()
    check = check_exactly_once(ledgers, fleet.examples)
    return DrillReport.of(
        "broker_server SIGKILL + restart (store)",
        check,
        devices=devices,
        rounds=rounds,
        faults=server.kills,
        recover_s=max(recover),
        reconnects=server.starts - 1,
        retransmits=fleet.retransmits(),
        wall_s=time.monotonic() - began,
        notes=f"{devices - devices // 2} devices behind a {slow_delay_s:.1f}s-delay link",
        extra={
            "accepted_before_kill": before,
            "resent_accepted": check.resent_accepted,
            "resumed": output.count("resuming round"),
        },
    )
