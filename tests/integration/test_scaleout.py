"""Scale-out over a real Mosquitto and a real PostgreSQL: a coordinator, 1 or 3 workers, 8 real agents.

The same 2-round federation (same agents, data and seeds) runs once with one worker and once with
three sharing ``$share/fedflock-workers/...``. In the three-worker run one agent is held back in
round 1 while six copies of an update already counted are published on its device's results
topic (as a broker re-delivering a QoS 1 message would): Mosquitto hands them round-robin to the
workers, so some reach the worker that counted the original (a local duplicate) and some reach
another one, which only the store's claim refuses. Both runs must make the same global model
(float tolerance: the partial sums are added in another grouping), and every update must be
counted exactly once: 8 accepted tasks per round with their first attempt's key, 8 claims, the
new versions' example counts the devices' sum.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from broker_server.persistence import PostgresServerStore
from broker_server.persistence.postgres_process import PostgresProcess
from broker_server.persistence.scaleout import ScaleoutLedger
from broker_server.scaleout import ScaleoutCoordinator, ScaleoutSettings, ScaleoutWorker
from broker_server.server_config import RoundResult, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.protocol.messages import UpdateMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from fedflock.wiring import device_transport, server_transport
from tests.broker_server.persistence.conftest import postgres_server  # noqa: F401

EXAMPLES = (20, 28, 36, 44, 24, 32, 40, 48)
COPIES = 6
SETTINGS = ScaleoutSettings(heartbeat_s=0.05, flush_interval_s=0.5, lease_s=5.0, poll_s=0.05, close_timeout_s=10.0)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Fleet:
    """Eight agents, connected at once; each one's loop starts when the test says so."""

    def __init__(self, url: str, bundle: Bundle, topics: Topics) -> None:
        self.stop = threading.Event()
        self.agents: list[Agent] = []
        self.threads: list[threading.Thread] = []
        for i, n in enumerate(EXAMPLES):
            rng = np.random.default_rng(100 + i)
            data = Dataset(rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64))
            transport = device_transport(url, f"so-{i}", bundle_digest=bundle.digest, num_examples=n, topics=topics)
            agent = Agent(
                AgentConfig(device_id=f"so-{i}", topics=topics, seed=i), transport, OrtTrainer.open(bundle), data
            )
            agent.start()
            self.agents.append(agent)
            self.threads.append(threading.Thread(target=agent.run, args=(self.stop,), kwargs={"poll_s": 0.02}))

    def run(self, *which: int) -> None:
        for i in which:
            self.threads[i].start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout=20)
        for agent in self.agents:
            agent.close()


class Workers:
    """Worker threads, each with its own MQTT client and its own store connection."""

    def __init__(
        self, count: int, url: str, bundle: Bundle, open_store: Callable[[], PostgresServerStore], topics: Topics
    ) -> None:
        self.stop, self.errors = threading.Event(), list[BaseException]()
        self.workers = []
        for i in range(count):
            store = open_store()
            self.workers.append(
                ScaleoutWorker(
                    server_transport(url, f"{topics.prefix}-w{i}"),
                    bundle.manifest.aggregated_tensors,
                    store=store,
                    ledger=ScaleoutLedger(store, clock=time.time),
                    settings=ScaleoutSettings(**{**SETTINGS.__dict__, "worker_id": f"w{i}"}),
                    topics=topics,
                )
            )
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in self.workers]

    def _run(self, worker: ScaleoutWorker) -> None:
        try:
            worker.run(self.stop)
        except BaseException as exc:  # reported by the test, which fails on any
            self.errors.append(exc)
            raise

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=20)

    def total(self, counter: str) -> int:
        return sum(getattr(w, counter) for w in self.workers)


@dataclass
class Run:
    weights: dict[str, np.ndarray]
    results: list[RoundResult]
    store: PostgresServerStore
    workers: Workers


def inject_duplicates(url: str, topics: Topics, fleet: Fleet, workers: Workers) -> None:
    """Hold agent 7; once the other 7 updates of round 1 are out, publish copies of one of them."""
    spy = server_transport(url, f"{topics.prefix}-spy")
    spy.start()
    spy.subscribe(topics.all_devices("results"), qos=1)
    seen: list[tuple[str, bytes]] = []
    try:
        fleet.run(*range(7))
        while len(seen) < 7:
            inbound = spy.receive(timeout=30)
            assert inbound is not None, "the spy saw no round-1 update"
            if isinstance(decode_message(inbound.payload), UpdateMessage):
                seen.append((inbound.topic, inbound.payload))
        wait_for(lambda: workers.total("accepted") == 7, 30, "7 counted updates")
        topic, payload = seen[0]
        for _ in range(COPIES):
            spy.publish(topic, payload, qos=1)
        wait_for(lambda: workers.total("duplicates") >= COPIES, 30, "the copies to be refused")
    finally:
        spy.close()
        fleet.run(7)


def federation(url: str, pg: PostgresProcess, bundle: Bundle, *, workers: int, inject: bool) -> Iterator[Run]:
    prefix, schema = f"so{uuid.uuid4().hex[:6]}/v1", f"so_{uuid.uuid4().hex[:12]}"
    topics = Topics(prefix)

    def open_store() -> PostgresServerStore:
        return PostgresServerStore.open(pg.conninfo("fedflock_test"), schema=schema)

    config = ServerConfig(
        rounds=2,
        clients_per_round=8,
        min_clients=8,
        min_reports=8,
        wait_for_clients_s=30,
        round_timeout_s=30,
        local_epochs=1,
        batch_size=8,
        codecs=("fp32",),
        topics=topics,
        model_channel=None,
    )
    store = open_store()
    fleet = Fleet(url, bundle, topics)
    crew = Workers(workers, url, bundle, open_store, topics)
    coordinator = ScaleoutCoordinator(
        server_transport(url, f"{prefix}-coordinator"), bundle, config, store=store, settings=SETTINGS
    )
    helper = None
    try:
        crew.start()
        coordinator.start()
        if inject:
            helper = threading.Thread(target=inject_duplicates, args=(url, topics, fleet, crew))
            helper.start()
        else:
            fleet.run(*range(len(EXAMPLES)))
        results = coordinator.run()
        yield Run(weights=coordinator.weights, results=results, store=store, workers=crew)
    finally:
        if helper is not None:
            helper.join(timeout=30)
        coordinator.close()
        crew.close()
        fleet.close()
        for worker in crew.workers:
            worker._store.close()
        store.close()
    assert not crew.errors, crew.errors


def check_counted_once(run: Run) -> None:
    assert [(r.round, r.completed, r.reported, r.num_examples) for r in run.results] == [
        (1, True, 8, sum(EXAMPLES)),
        (2, True, 8, sum(EXAMPLES)),
    ]
    ledger = ScaleoutLedger(run.store, clock=time.time)
    for number in (1, 2):
        snapshot = run.store.load_round(number)
        assert snapshot.round.status == "completed" and len(snapshot.accepted) == 8
        assert all(t.state == "accepted" and (t.key or "").endswith("/1") for t in snapshot.tasks), snapshot.tasks
        assert snapshot.checkpoint.count == 8
        claims = ledger.claims(number)
        assert sorted(claims) == sorted(snapshot.accepted) and all(c.flushed for c in claims.values())
        held = [t for p in ledger.partials(number) for t in p.checkpoint.accepted]
        assert sorted(held) == sorted(snapshot.accepted)  # every update in exactly one partial
        version = run.store.get_model_version(number, weights=False)
        assert version is not None and version.metrics["num_examples"] == sum(EXAMPLES)
    assert run.workers.total("accepted") == 16
    assert all(not w.rejections for w in run.workers.workers), [list(w.rejections) for w in run.workers.workers]


@pytest.mark.timeout(120)
def test_three_workers_make_the_one_worker_model_and_count_every_update_once(
    mosquitto,
    mlp_bundle: Bundle,
    postgres_server: PostgresProcess,  # noqa: F811
) -> None:
    for one in federation(mosquitto.url, postgres_server, mlp_bundle, workers=1, inject=False):
        check_counted_once(one)
        reference = one.weights
    for three in federation(mosquitto.url, postgres_server, mlp_bundle, workers=3, inject=True):
        check_counted_once(three)
        busy = [w.accepted for w in three.workers.workers]
        assert sum(n > 0 for n in busy) >= 2, busy  # the shared subscription spread the updates
        assert three.workers.total("duplicates") >= COPIES
        assert three.workers.total("claim_conflicts") >= 1  # a copy reached another worker: the store refused it
        assert set(three.weights) == set(reference)
        initial = mlp_bundle.initial_weights()
        assert [n for n, v in reference.items() if not np.array_equal(v, initial[n])], "the model never changed"
        for name, value in reference.items():
            np.testing.assert_allclose(three.weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
