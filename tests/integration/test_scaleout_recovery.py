"""Scale-out recovery over a real Mosquitto and a real PostgreSQL, with real agents and processes.

* a device that reconnects mid-round gets its TASK again (unless a worker already claimed it);
* a coordinator SIGKILLed mid-round is replaced by a new one that resumes the round: the
  updates flushed before count, the TASKs without a claim are sent again, the round completes;
* a worker SIGKILLed mid-round: its flushed updates count, its unflushed ones are fenced and
  re-obtained through re-sent TASKs (a second attempt, counted by another worker), nothing twice
  — even when the last agents answered before the fence, so that the dead worker's unflushed
  claims once made the round look complete.

Processes are forked before any MQTT client of the test exists; every process has its own MQTT
client and its own PostgreSQL connection.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from broker_server.persistence import PostgresServerStore
from broker_server.persistence.postgres_process import PostgresProcess
from broker_server.persistence.scaleout import ScaleoutLedger
from broker_server.scaleout import ScaleoutCoordinator, ScaleoutSettings, ScaleoutWorker
from broker_server.server_config import RoundResult, ServerConfig
from edge_agent.protocol.messages import StatusMessage, TaskMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from fedflock.wiring import server_transport
from tests.broker_server.persistence.conftest import postgres_server  # noqa: F401
from tests.integration.test_scaleout import EXAMPLES, Fleet, wait_for

SETTINGS = ScaleoutSettings(heartbeat_s=0.05, flush_interval_s=0.3, lease_s=1.0, poll_s=0.05, close_timeout_s=10.0)
#: the dead worker's lease in the worker-crash test: long enough for the last agents to answer first
LEASE_S = 4.0
ALL = tuple(range(len(EXAMPLES)))


@dataclass
class Place:
    """One federation's MQTT prefix and PostgreSQL schema."""

    url: str
    conninfo: str
    schema: str
    topics: Topics

    def store(self) -> PostgresServerStore:
        return PostgresServerStore.open(self.conninfo, schema=self.schema)

    def config(self) -> ServerConfig:
        return ServerConfig(
            rounds=1,
            clients_per_round=8,
            min_clients=8,
            min_reports=8,
            wait_for_clients_s=30,
            round_timeout_s=30,
            local_epochs=1,
            batch_size=8,
            codecs=("fp32",),
            topics=self.topics,
            model_channel=None,
        )


@pytest.fixture
def place(mosquitto: Any, postgres_server: PostgresProcess) -> Place:  # noqa: F811
    prefix = f"sr{uuid.uuid4().hex[:6]}/v1"
    place = Place(
        mosquitto.url, postgres_server.conninfo("fedflock_test"), f"sr_{uuid.uuid4().hex[:12]}", Topics(prefix)
    )
    # create the schema before the processes connect at once: two concurrent CREATE SCHEMA IF NOT
    # EXISTS of one name can fail in PostgreSQL (a unique violation on pg_namespace)
    place.store().close()
    return place


def _worker_process(place: Place, bundle: Bundle, settings: ScaleoutSettings) -> None:
    store = place.store()
    worker = ScaleoutWorker(
        server_transport(place.url, f"{place.topics.prefix}-{settings.worker_id}"),
        bundle.manifest.aggregated_tensors,
        store=store,
        ledger=ScaleoutLedger(store, clock=time.time),
        settings=settings,
        topics=place.topics,
    )
    worker.start()
    worker.run(threading.Event())  # until killed


def _coordinator_process(place: Place, bundle: Bundle) -> None:
    store = place.store()
    coordinator = ScaleoutCoordinator(
        server_transport(place.url, f"{place.topics.prefix}-c1"), bundle, place.config(), store=store, settings=SETTINGS
    )
    coordinator.start()
    coordinator.run()  # until killed


@contextmanager
def forked(target: Callable[..., None], *args: Any) -> Iterator[multiprocessing.process.BaseProcess]:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    try:
        yield process
    finally:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=10)


def kill(process: multiprocessing.process.BaseProcess) -> None:
    assert process.pid is not None and process.is_alive(), "the process died on its own"
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=10)


class WorkerThread:
    def __init__(self, place: Place, bundle: Bundle, name: str) -> None:
        self.store, self.stop, self.errors = place.store(), threading.Event(), list[BaseException]()
        self.worker = ScaleoutWorker(
            server_transport(place.url, f"{place.topics.prefix}-{name}"),
            bundle.manifest.aggregated_tensors,
            store=self.store,
            ledger=ScaleoutLedger(self.store, clock=time.time),
            settings=replace(SETTINGS, worker_id=name),
            topics=place.topics,
        )
        self.worker.start()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=20)
        self.store.close()
        assert not self.errors, self.errors


class TaskSpy:
    """Counts the TASKs published per task id (a plain subscription next to the devices')."""

    def __init__(self, place: Place) -> None:
        self.sent: Counter[str] = Counter()
        self.device: dict[str, str] = {}
        self._transport = server_transport(place.url, f"{place.topics.prefix}-spy-{uuid.uuid4().hex[:4]}")
        self._transport.start()
        self._transport.subscribe(place.topics.all_devices("tasks"), qos=1)
        self.publish = self._transport.publish

    def drain(self) -> Counter[str]:
        while (inbound := self._transport.receive(timeout=0.05)) is not None:
            message = decode_message(inbound.payload)
            if isinstance(message, TaskMessage):
                self.sent[message.task_id] += 1
                self.device[message.task_id] = message.device_id
        return self.sent

    def close(self) -> None:
        self._transport.close()


class Coordinator:
    """A coordinator in a thread of the test (its results checked after :meth:`join`)."""

    def __init__(self, place: Place, bundle: Bundle, settings: ScaleoutSettings = SETTINGS) -> None:
        self.store = place.store()
        self.coordinator = ScaleoutCoordinator(
            server_transport(place.url, f"{place.topics.prefix}-c2"),
            bundle,
            place.config(),
            store=self.store,
            settings=settings,
        )
        self.coordinator.start()
        self.results: list[RoundResult] = []
        self.thread = threading.Thread(target=lambda: self.results.extend(self.coordinator.run()))
        self.thread.start()

    def join(self) -> list[RoundResult]:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the coordinator did not finish its round"
        return self.results

    def close(self) -> None:
        self.coordinator.close()
        self.store.close()


def by_device(store: PostgresServerStore) -> dict[str, str]:
    return {device: task for task, device in store.load_round(1).round.tasks.items()}


def check_counted_once(store: PostgresServerStore, results: list[RoundResult]) -> None:
    assert [(r.round, r.completed, r.reported, r.num_examples) for r in results] == [
        (1, True, 8, sum(EXAMPLES)),
    ], results
    snapshot, ledger = store.load_round(1), ScaleoutLedger(store, clock=time.time)
    assert snapshot.round.status == "completed" and len(snapshot.accepted) == 8
    assert snapshot.checkpoint.count == 8
    assert snapshot.checkpoint.total_weight == pytest.approx(sum(EXAMPLES))
    held = [t for p in ledger.partials(1) for t in p.checkpoint.accepted]
    assert sorted(held) == sorted(snapshot.accepted)  # every update in exactly one partial
    version = store.get_model_version(1, weights=False)
    assert version is not None and version.metrics["num_examples"] == sum(EXAMPLES)


@pytest.mark.timeout(90)
def test_a_device_that_reconnects_gets_its_unclaimed_task_again(place: Place, mlp_bundle: Bundle) -> None:
    fleet = Fleet(place.url, mlp_bundle, place.topics)
    worker = WorkerThread(place, mlp_bundle, "w1")
    spy = TaskSpy(place)
    coordinator = Coordinator(place, mlp_bundle)
    try:
        wait_for(lambda: len(spy.drain()) == 8, 30, "the 8 TASKs")
        fleet.run(*range(7))
        ledger = ScaleoutLedger(coordinator.store, clock=time.time)
        wait_for(lambda: len(ledger.claims(1)) == 7, 30, "7 claims")
        tasks = by_device(coordinator.store)
        for device in ("so-0", "so-7"):  # so-0's result is claimed: no re-send; so-7's is not
            n = EXAMPLES[int(device[3:])]
            for online in (False, True):
                status = StatusMessage(device_id=device, online=online, bundle_digest=mlp_bundle.digest, num_examples=n)
                spy.publish(place.topics.status(device), encode_message(status), qos=1, retain=True)
        wait_for(lambda: spy.drain()[tasks["so-7"]] == 2, 15, "so-7's TASK again")
        fleet.run(7)
        results = coordinator.join()
        assert spy.drain()[tasks["so-0"]] == 1
        assert coordinator.coordinator.resent == 1
        check_counted_once(coordinator.store, results)
    finally:
        spy.close()
        coordinator.close()
        worker.close()
        fleet.close()


@pytest.mark.timeout(90)
def test_a_restarted_coordinator_resumes_the_open_round(place: Place, mlp_bundle: Bundle) -> None:
    with forked(_coordinator_process, place, mlp_bundle) as first:
        fleet = Fleet(place.url, mlp_bundle, place.topics)
        worker = WorkerThread(place, mlp_bundle, "w1")
        spy = TaskSpy(place)
        store = place.store()
        coordinator = None
        try:
            ledger = ScaleoutLedger(store, clock=time.time)
            wait_for(lambda: len(spy.drain()) == 8, 30, "the first coordinator's 8 TASKs")
            fleet.run(0, 1, 2, 3)
            wait_for(lambda: sum(c.flushed for c in ledger.claims(1).values()) == 4, 30, "4 flushed claims")
            kill(first)
            assert ledger.round_status(1) == "collecting"
            coordinator = Coordinator(place, mlp_bundle)  # resumes round 1 from the store
            tasks = by_device(store)
            late = {tasks[f"so-{i}"] for i in (4, 5, 6, 7)}
            wait_for(lambda: all(spy.drain()[t] == 2 for t in late), 15, "the unclaimed TASKs again")
            fleet.run(4, 5, 6, 7)
            results = coordinator.join()
            assert {t: n for t, n in spy.drain().items() if n > 1}.keys() == late  # claimed ones: not re-sent
            assert coordinator.coordinator.resent == 4
            check_counted_once(store, results)
            assert worker.worker.accepted == 8
        finally:
            spy.close()
            if coordinator is not None:
                coordinator.close()
            worker.close()
            fleet.close()
            store.close()


@pytest.mark.timeout(90)
def test_a_killed_workers_flushed_updates_count_and_its_unflushed_ones_come_back(
    place: Place, mlp_bundle: Bundle
) -> None:
    slow = replace(SETTINGS, worker_id="wA", flush_interval_s=3.0)
    with forked(_worker_process, place, mlp_bundle, slow) as doomed:
        store = place.store()
        ledger = ScaleoutLedger(store, clock=time.time)
        wait_for(lambda: any(w.worker_id == "wA" for w in ledger.workers()), 30, "worker A")
        fleet = Fleet(place.url, mlp_bundle, place.topics)
        coordinator = Coordinator(place, mlp_bundle, replace(SETTINGS, lease_s=LEASE_S))
        survivor = None
        try:
            fleet.run(0, 1, 2)
            wait_for(lambda: sum(c.flushed for c in ledger.claims(1).values()) == 3, 30, "A's first flush")
            fleet.run(3, 4)  # A claims these two before its next flush, 3 s later
            wait_for(lambda: len(ledger.claims(1)) == 5, 10, "A's next 2 claims")
            kill(doomed)
            killed_at = time.monotonic()
            claims = ledger.claims(1)
            session = {c.session for c in claims.values()}
            assert len(session) == 1 and sorted(c.flushed for c in claims.values()) == [False] * 2 + [True] * 3
            tasks = by_device(store)
            flushed = {tasks[f"so-{i}"] for i in (0, 1, 2)}
            unflushed = {tasks[f"so-{i}"] for i in (3, 4)}
            survivor = WorkerThread(place, mlp_bundle, "wB")
            (dead,) = session
            wait_for(lambda: dead not in coordinator.coordinator.beats.beating, 10, "A to miss 3 beats")
            fleet.run(5, 6, 7)  # the last agents answer long before A's lease runs out
            wait_for(lambda: len(ledger.claims(1)) == 8, 10, "B's 3 claims")
            # 8 claims, 2 of them A's unflushed ones: they do not count, so the round still
            # collects (it used to close here, lose them and be abandoned) until A is fenced,
            # its 2 claims deleted and their TASKs sent again
            assert time.monotonic() - killed_at < LEASE_S and not coordinator.coordinator.fenced
            assert ledger.round_status(1) == "collecting"
            results = coordinator.join()
            check_counted_once(store, results)
            assert coordinator.coordinator.fenced == [dead] and coordinator.coordinator.resent == 2
            assert [w.status for w in ledger.workers() if w.session == dead] == ["fenced"]
            partials = {p.session: p.checkpoint.accepted for p in ledger.partials(1)}
            assert partials[dead] == flushed  # A's flushed updates count
            assert partials[str(survivor.worker.session)] == set(tasks.values()) - flushed
            keys = {t.task_id: t.key or "" for t in store.load_round(1).tasks}
            assert all(keys[t].endswith("/1") for t in flushed)
            assert all(keys[t].endswith("/2") for t in unflushed), keys  # re-obtained: the agents' 2nd attempt
            assert survivor.worker.accepted == 5
            initial = mlp_bundle.initial_weights()
            assert any(not np.array_equal(v, initial[n]) for n, v in coordinator.coordinator.weights.items())
        finally:
            coordinator.close()
            if survivor is not None:
                survivor.close()
            fleet.close()
            store.close()
