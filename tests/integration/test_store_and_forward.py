"""Store-and-forward against a real Mosquitto: results outlive broker outages and agent crashes.

The server side is a :class:`RoundState`, the bookkeeping :class:`FederatedServer` folds results
into, fed by a plain subscriber: it accepts one update per task and counts the rest as duplicates.

* Broker down: an in-process agent finishes training while its (dedicated) broker is stopped; the
  result waits in the outbox, the failed send backs off, and after the broker returns on the same
  port the server accepts the update exactly once.
* SIGKILL: a ``fedflock agent`` process is killed after its UPDATE reached the broker but before
  the broker's PUBACK reached the agent, so the result is still undelivered in its outbox. A TCP
  proxy between agent and broker makes that window deterministic: once the agent publishes on its
  results topic, the proxy stops passing anything from the broker back to the agent, and the
  agent waits for the PUBACK (30 s publish timeout) until it is killed. Restarted on the same
  state directory it sends the result again (attempt 2), which the server refuses as a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.rounds import RoundState
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.protocol.messages import StatusMessage, TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from fedflock.wiring import device_transport
from tests.fixtures import digits_split, write_npz

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def data() -> Dataset:
    devices, _ = digits_split(2)
    return Dataset(devices[0].x[:160], devices[0].y[:160])


def make_task(bundle: Bundle, device_id: str, task_id: str) -> TaskMessage:
    return TaskMessage(
        device_id=device_id,
        round=1,
        task_id=task_id,
        model_version=0,
        bundle_digest=bundle.digest,
        epochs=1,
        batch_size=16,
        lr=0.05,
        deadline_s=600,
        weights=bundle.initial_weights(),
    )


def new_round(bundle: Bundle, task: TaskMessage) -> RoundState:
    return RoundState(
        round=task.round,
        model_version=task.model_version,
        tasks={task.task_id: task.device_id},
        specs=bundle.manifest.aggregated_tensors,
    )


def server(host: str, port: int, client_id: str, *, persistent: bool = False) -> MqttTransport:
    config = MqttConfig(
        host=host,
        port=port,
        client_id=client_id,
        clean_session=not persistent,
        reconnect_min_delay=0.1,
        reconnect_max_delay=0.5,
    )
    return MqttTransport(config)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def collect_updates(
    transport: MqttTransport, until: Callable[[list[UpdateMessage]], bool], quiet_s: float
) -> list[UpdateMessage]:
    """UPDATEs received until ``until(updates)`` holds and then ``quiet_s`` passed without another."""
    updates: list[UpdateMessage] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        inbound = transport.receive(timeout=quiet_s)
        if inbound is None:
            if until(updates):
                return updates
            continue
        message = decode_message(inbound.payload)
        if isinstance(message, UpdateMessage):
            updates.append(message)
    raise AssertionError(f"no complete set of updates within 30 s: {[u.attempt for u in updates]}")


# -- broker down -------------------------------------------------------------------------------


def test_a_result_trained_while_the_broker_is_down_reaches_the_server_once_it_is_back(
    digits_bundle: Bundle, data: Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics, device_id = Topics("sf-down"), "dev-down"
    workdir = tmp_path / "mosquitto"
    # Persistence keeps the server's session (subscription + queue) across the restart, so the
    # server hears everything the agent sends, whichever of the two reconnects first.
    broker = MosquittoProcess(workdir, extra_config=("persistence true", f"persistence_location {workdir}/"))
    broker.start()
    listener = server(broker.host, broker.port, "sf-down-server", persistent=True)
    base = device_transport(
        broker.url, device_id, bundle_digest=digits_bundle.digest, num_examples=len(data), topics=topics
    )
    link = MqttTransport(replace(base.config, reconnect_min_delay=0.1, reconnect_max_delay=0.5, publish_timeout=5))
    skew = [0.0]  # the agent's monotonic clock: moved forward to skip its upload backoff
    agent = Agent(
        AgentConfig(device_id=device_id, topics=topics, state_dir=tmp_path / "device", seed=1),
        link,
        OrtTrainer.open(digits_bundle),
        data,
        clock=lambda: time.monotonic() + skew[0],
    )
    task = make_task(digits_bundle, device_id, "r1-down")
    state = new_round(digits_bundle, task)
    try:
        listener.start()
        listener.subscribe(topics.results(device_id))
        agent.start()
        listener.publish(topics.tasks(device_id), encode_message(task), qos=1)
        inbound = link.receive(timeout=10)
        assert inbound is not None and isinstance(decode_message(inbound.payload), TaskMessage)

        broker.stop()
        wait_until(lambda: not link.is_connected(), 10, "the agent to notice the broker is gone")
        with caplog.at_level(logging.INFO, logger="fedflock.agent"):
            agent.handle_payload(inbound.payload)  # trains, stores, fails to send
        assert agent.tasks_done == 1
        stored = agent.store.get_result(task.task_id)
        assert stored is not None and stored.attempts == 1 and stored.delivered_at is None
        assert any("not delivered (attempt 1" in r.getMessage() for r in caplog.records)
        agent.tick()  # backing off: no second attempt yet
        assert agent.store.get_result(task.task_id).attempts == 1  # type: ignore[union-attr]

        broker.start()  # same port, same persistence file
        wait_until(link.is_connected, 15, "the agent to reconnect")
        wait_until(listener.is_connected, 15, "the server to reconnect")
        skew[0] += 3600.0
        agent.tick()
        delivered = agent.store.get_result(task.task_id)
        assert delivered is not None and delivered.attempts == 2 and delivered.delivered_at is not None

        updates = collect_updates(listener, lambda got: any(u.attempt == 2 for u in got), quiet_s=1.0)
        verdicts = [state.accept_update(update) for update in updates]
        # paho also re-sends the publish that failed while disconnected (attempt 1) from its own
        # in-memory queue: the server may hear the result twice, and counts it once.
        assert {u.attempt for u in updates} <= {1, 2} and len(updates) <= 2
        assert verdicts.count(True) == 1 and state.accepted == {task.task_id}
        assert state.duplicates == len(updates) - 1
        assert len({u.payload for u in updates}) == 1 and state.num_examples == len(data)
    finally:
        agent.close()
        listener.close()
        broker.stop()


# -- SIGKILL between the broker's receipt and the agent's bookkeeping -----------------------------


class PubackBlocker:
    """A TCP proxy in front of a broker that stops all broker -> client traffic for good as soon as
    a client sends bytes containing ``trigger`` (the results topic, i.e. the UPDATE's PUBLISH).

    The flag is set before the triggering bytes are forwarded, so the broker cannot have answered
    them yet: the PUBACK is never passed on.
    """

    def __init__(self, upstream: tuple[str, int], trigger: bytes) -> None:
        self.upstream = upstream
        self.trigger = trigger
        self.triggered = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = [self._server]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if from_client:
                    if self.trigger in tail + chunk:
                        self.triggered.set()
                    tail = (tail + chunk)[-len(self.trigger) :]
                elif self.triggered.is_set():
                    continue  # swallow the PUBACK and everything after it
                sink.sendall(chunk)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        for sock in self._sockets:
            sock.close()


def start_agent(url: str, bundle: Path, data: Path, state_dir: Path, log: Path, prefix: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedflock", "agent", "--bundle", str(bundle), "--data", str(data)]
    cmd += ["--device-id", "dev-kill", "--mqtt-url", url, "--state-dir", str(state_dir), "--topic-prefix", prefix]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def outbox_row(state_dir: Path, task_id: str) -> tuple[int, float | None]:
    """``(attempts, delivered_at)`` of the result, read while the agent may still hold the store."""
    with sqlite3.connect(f"file:{state_dir / 'agent.db'}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT attempts, delivered_at FROM results WHERE task_id = ?", (task_id,)).fetchone()
    assert row is not None, f"no result for {task_id} in the outbox"
    return int(row[0]), row[1]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def wait_online(listener: MqttTransport, topics: Topics, device_id: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        inbound = listener.receive(timeout=0.2)
        if inbound is None or inbound.topic != topics.status(device_id) or not inbound.payload:
            continue
        message = decode_message(inbound.payload)
        if isinstance(message, StatusMessage) and message.online:
            return
    raise AssertionError(f"agent never came online (exit code {process.poll()})")


def test_an_agent_killed_before_its_puback_resends_on_restart_and_the_server_counts_it_once(
    mosquitto: MosquittoProcess,
    digits_bundle: Bundle,
    data: Dataset,
    tmp_path: Path,
    processes: list[subprocess.Popen],
) -> None:
    topics, device_id = Topics("sf-kill"), "dev-kill"
    state_dir, log = tmp_path / "device", tmp_path / "agent.log"
    npz = write_npz(tmp_path / "dev.npz", data)
    task = make_task(digits_bundle, device_id, "r1-kill")
    state = new_round(digits_bundle, task)
    listener = server(mosquitto.host, mosquitto.port, "sf-kill-server")
    proxy = PubackBlocker((mosquitto.host, mosquitto.port), topics.results(device_id).encode())
    try:
        listener.start()
        listener.subscribe(topics.results(device_id))
        listener.subscribe(topics.status(device_id))
        first = start_agent(f"mqtt://127.0.0.1:{proxy.port}", digits_bundle.directory, npz, state_dir, log, "sf-kill")
        processes.append(first)
        wait_online(listener, topics, device_id, first)
        listener.publish(topics.tasks(device_id), encode_message(task), qos=1)

        [update] = collect_updates(listener, lambda got: len(got) == 1, quiet_s=0.5)
        assert proxy.triggered.is_set()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The kill landed in the window: the broker has the update, the agent's outbox does not know.
        assert outbox_row(state_dir, task.task_id) == (1, None)
        assert update.attempt == 1 and state.accept_update(update)
        proxy.close()

        second = start_agent(mosquitto.url, digits_bundle.directory, npz, state_dir, log, "sf-kill")
        processes.append(second)
        [again] = collect_updates(listener, lambda got: len(got) == 1, quiet_s=1.0)
        assert again.attempt == 2 and again.payload == update.payload and again.task_id == task.task_id
        assert not state.accept_update(again)  # refused as a duplicate
        assert state.accepted == {task.task_id} and state.duplicates == 1
        wait_until(lambda: outbox_row(state_dir, task.task_id)[1] is not None, 10, "the resend to be delivered")
        assert outbox_row(state_dir, task.task_id)[0] == 2
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, log.read_text()
    finally:
        proxy.close()
        listener.close()
