"""Drill: the device's disk fills up while it trains; space comes back later.

A device agent keeps its state (``agent.db`` and the rest of ``state_dir``) on a small tmpfs
(:class:`~fedflock.drills.disk.SizeLimitedDir`). The server (in-process, SQLite store on a normal
disk) sends a TASK; the agent stores it in its inbox, then the filesystem is filled to ENOSPC
and the agent trains. Storing the result must fail with a clear
:class:`~edge_agent.store.StorageFull` naming the file, leave the store intact (``PRAGMA
integrity_check`` ok, the task still pending, no half-written result) and, once the filler is
deleted, a restarted agent on the same state directory must train again and deliver: the server
counts the update exactly once. Repeated ``repeats`` times (one round each).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.server import ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.errors import FedflockError
from edge_agent.protocol.messages import TaskMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.store import DeviceStore, StoreConfig
from edge_agent.transport.mqtt import MqttTransport
from fedflock.drills.disk import SizeLimitedDir
from fedflock.drills.processes import wait_for
from fedflock.drills.report import DrillReport, check_exactly_once
from fedflock.drills.server import DrillServer
from fedflock.wiring import device_transport

__all__ = ["DiskFullOutcome", "disk_full_drill"]

DEVICE = "disk-0"
EXAMPLES = 40


@dataclass(frozen=True, kw_only=True)
class DiskFullOutcome:
    """What the full disk did, per repeat: the error, and the store's state while full."""

    error_types: tuple[str, ...]
    messages: tuple[str, ...]
    integrity: tuple[str, ...]
    pending_while_full: tuple[int, ...]
    results_while_full: tuple[int, ...]


def _agent(url: str, bundle: Bundle, state_dir: Path, topics: Topics) -> tuple[Agent, MqttTransport]:
    rng = np.random.default_rng(3)
    data = Dataset(rng.standard_normal((EXAMPLES, 4)).astype(np.float32), rng.integers(0, 3, EXAMPLES).astype(np.int64))
    base = device_transport(url, DEVICE, bundle_digest=bundle.digest, num_examples=EXAMPLES, topics=topics)
    link = MqttTransport(replace(base.config, reconnect_min_delay=0.2, reconnect_max_delay=1.0))
    # error feedback on (the default): its codec residual is written before the result and meets
    # ENOSPC first; write_tensor_file turns that into StorageFull (docs/drills.md, "Found by the drills")
    config = AgentConfig(device_id=DEVICE, topics=topics, state_dir=state_dir, seed=1, store=StoreConfig())
    return Agent(config, link, OrtTrainer.open(bundle), data), link


def _take_task(link: MqttTransport, timeout: float) -> tuple[TaskMessage, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inbound = link.receive(timeout=0.2)
        if inbound is None:
            continue
        message = decode_message(inbound.payload)
        if isinstance(message, TaskMessage):
            return message, inbound.payload
    raise AssertionError("no TASK reached the device")


def _integrity(db: Path) -> tuple[str, int, int]:
    """(integrity_check verdict, pending tasks, results) read-only, as a separate process would."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        verdict = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
        pending = int(conn.execute("SELECT count(*) FROM tasks WHERE done_at IS NULL").fetchone()[0])
        results = int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    return verdict, pending, results


def disk_full_drill(
    work: Path, broker: MosquittoProcess, bundle: Bundle, *, repeats: int = 1, disk_bytes: int = 4 * 1024 * 1024
) -> tuple[DrillReport, DiskFullOutcome]:
    began = time.monotonic()
    prefix = f"drill-disk-{uuid.uuid4().hex[:8]}/v1"
    topics = Topics(prefix)
    config = ServerConfig(
        rounds=repeats,
        clients_per_round=1,
        min_clients=1,
        round_timeout_s=90,
        wait_for_clients_s=60,
        local_epochs=1,
        batch_size=8,
        codecs=("fp32",),
        topics=topics,
    )
    server = DrillServer(broker.host, broker.port, bundle, config, work / "server.db", client_id=f"{prefix}-server")
    disk = SizeLimitedDir(work / "disk", disk_bytes)
    state_dir = disk.path / "state"
    errors: list[FedflockError] = []
    checks: list[tuple[str, int, int]] = []
    recover: list[float] = []
    task_ids: list[str] = []
    disk.start()
    try:
        server.start()
        for number in range(1, repeats + 1):
            agent, link = _agent(broker.url, bundle, state_dir, topics)
            agent.start()
            server.start_round(number)
            task, envelope = _take_task(link, 60)
            task_ids.append(task.task_id)
            now = time.time()
            agent.store.put_task(task.task_id, task.round, envelope, now, now + task.deadline_s)  # as the agent does
            disk.fill()
            try:
                agent.tick()  # trains, then fails to store the result
            except FedflockError as exc:
                errors.append(exc)
            else:
                raise AssertionError("the agent stored its result on a full disk")
            try:
                agent.close()
            except FedflockError as exc:  # closing may need to write, too
                errors.append(exc)
            checks.append(_integrity(state_dir / "agent.db"))
            disk.free()
            freed = time.monotonic()
            agent, link = _agent(broker.url, bundle, state_dir, topics)
            agent.start()
            try:
                wait_for(partial(_delivered, agent, task.task_id), 60, "the result to be delivered", poll_s=0)
            finally:
                agent.close()
            recover.append(time.monotonic() - freed)
            result = server.finish_round(60)
            if not result.completed:
                raise AssertionError(f"round {number} did not complete: {result.reason}")
        ledgers = server.ledger(range(1, repeats + 1))
        with DeviceStore.open(state_dir / "agent.db") as store:
            store.verify()
            rows = [store.get_result(task_id) for task_id in task_ids]
            retransmits = sum(max(row.attempts - 1, 0) for row in rows if row is not None)
    finally:
        server.close()
        disk.close()
    check = check_exactly_once(ledgers, {DEVICE: EXAMPLES})
    outcome = DiskFullOutcome(
        error_types=tuple(type(e).__name__ for e in errors),
        messages=tuple(e.reason for e in errors),
        integrity=tuple(c[0] for c in checks),
        pending_while_full=tuple(c[1] for c in checks),
        results_while_full=tuple(c[2] for c in checks),
    )
    report = DrillReport.of(
        "device disk full",
        check,
        devices=1,
        rounds=repeats,
        faults=repeats,
        recover_s=max(recover),
        retransmits=retransmits,
        wall_s=time.monotonic() - began,
        notes=f"tmpfs of {disk_bytes // 1024} KiB filled to ENOSPC while training",
        extra={"errors": list(outcome.error_types)},
    )
    return report, outcome


def _delivered(agent: Agent, task_id: str) -> bool:
    agent.tick()
    item = agent.store.get_result(task_id)
    if item is not None and item.delivered_at is not None:
        return True
    time.sleep(0.05)
    return False
