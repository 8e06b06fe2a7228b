"""`fedflock broker --store sqlite:///...` killed mid-round with SIGKILL, restarted, over real Mosquitto.

Three in-process agents (real :class:`Agent`, onnxruntime, MQTT) train for a broker process:

1. ``agent-0`` runs; ``agent-1`` and ``agent-2`` are online but not yet processing their TASKs.
2. Once the store shows ``agent-0``'s update committed, the broker gets SIGKILL.
3. ``agent-1`` now trains and delivers its update to Mosquitto while no server listens: lost.
4. The same command again resumes round 1, re-sends the TASKs of ``agent-1`` and ``agent-2``;
   ``agent-1`` answers with its stored result (a second attempt), ``agent-2`` trains.

Every update must be counted exactly once: one accepted row per device, and the new version's
``num_examples`` is the three devices' example counts, not more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_server.persistence import SqliteServerStore
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from fedflock.wiring import device_transport

REPO = Path(__file__).resolve().parents[2]
PREFIX = "restart/v1"
EXAMPLES = (30, 45, 60)


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def broker_command(url: str, bundle: Bundle, tmp: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedflock",
        "broker",
        "--bundle",
        str(bundle.directory),
        "--mqtt-url",
        url,
        "--topic-prefix",
        PREFIX,
        "--rounds",
        "2",
        "--clients-per-round",
        "3",
        "--min-clients",
        "3",
        "--min-reports",
        "3",
        "--round-timeout",
        "120",
        "--wait-for-clients",
        "60",
        "--local-epochs",
        "1",
        "--batch-size",
        "8",
        "--codecs",
        "fp32",
        "--strategy",
        "fedavgm",
        "--strategy-option",
        "momentum=0.5",
        "--store",
        f"sqlite:///{tmp / 'server.db'}",
        "--out",
        str(tmp / "out"),
    ]


def start_broker(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Fleet:
    """Three agents; each one's loop starts only when the test says so."""

    def __init__(self, url: str, bundle: Bundle) -> None:
        rng = np.random.default_rng(5)
        self.stop = threading.Event()
        self.agents: list[Agent] = []
        self.threads: list[threading.Thread] = []
        topics = Topics(PREFIX)
        for i, n in enumerate(EXAMPLES):
            device_id = f"agent-{i}"
            data = Dataset(rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64))
            transport = device_transport(url, device_id, bundle_digest=bundle.digest, num_examples=n, topics=topics)
            config = AgentConfig(device_id=device_id, topics=topics, seed=i)
            agent = Agent(config, transport, OrtTrainer.open(bundle), data)
            agent.start()
            self.agents.append(agent)
            self.threads.append(threading.Thread(target=agent.run, args=(self.stop,), kwargs={"poll_s": 0.05}))

    def run(self, i: int) -> None:
        self.threads[i].start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout=20)
        for agent in self.agents:
            agent.close()


@pytest.fixture
def fleet(mosquitto, bundle: Bundle) -> Iterator[Fleet]:
    made = Fleet(mosquitto.url, bundle)
    yield made
    made.close()


def accepted_in_round_1(db: Path) -> int:
    if not db.exists():
        return 0
    store = SqliteServerStore.open(db)
    try:
        return len(store.load_round(1).accepted) if store.last_round() else 0
    finally:
        store.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("robust", [None, "median"])
def test_broker_killed_mid_round_resumes_and_counts_every_update_once(
    mosquitto, bundle, fleet, tmp_path, robust: str | None
) -> None:
    """With ``--robust median`` the round's rows live in memory only: agent-0's stored update is
    collected again by re-sending its TASK (it answers from its outbox), and not counted twice."""
    db, log = tmp_path / "server.db", tmp_path / "broker.log"
    command = broker_command(mosquitto.url, bundle, tmp_path) + (["--robust", robust] if robust else [])
    fleet.run(0)
    first = start_broker(command, log)
    try:
        wait_for(lambda: accepted_in_round_1(db) >= 1, 60, "the first committed update")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    assert accepted_in_round_1(db) == 1  # agent-0's; the others have not trained yet

    fleet.run(1)  # trains on the dead server's TASK; its update reaches nobody
    wait_for(lambda: fleet.agents[1].tasks_done == 1, 30, "agent-1 to finish its task")
    time.sleep(1.0)  # and to hand its update to Mosquitto

    second = start_broker(command, log)
    try:
        fleet.run(2)
        assert second.wait(timeout=120) == 0, log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
    output = log.read_text()
    if robust is None:
        assert "resuming round 1: 1 updates stored, re-sending 2 tasks (0 to collect stored updates)" in output, output
    else:
        assert "resuming round 1: 1 updates stored, re-sending 3 tasks (1 to collect stored updates)" in output, output
        assert "round 1: 1 updates accepted before the restart collected again" in output, output

    store = SqliteServerStore.open(db)
    try:
        round_1 = store.load_round(1)
        assert round_1.round.status == "completed" and round_1.round.result_version == 1
        rows = {t.device_id: t for t in round_1.tasks}
        assert sorted(rows) == ["agent-0", "agent-1", "agent-2"]
        assert all(t.state == "accepted" for t in rows.values()), rows
        # agent-1's first attempt was lost with the server; the re-sent TASK got its stored result again
        assert rows["agent-1"].key is not None and rows["agent-1"].key.endswith("/2"), rows["agent-1"]
        # agent-0's update is stored once, as first sent (with median it was sent again, not counted again)
        assert rows["agent-0"].key is not None and rows["agent-0"].key.endswith("/1"), rows["agent-0"]
        assert round_1.checkpoint.count == 3
        version_1 = store.get_model_version(1, weights=False)
        assert version_1 is not None and version_1.metrics["num_examples"] == sum(EXAMPLES)
        assert store.model_versions() == [0, 1, 2] and store.open_rounds() == []
        assert store.load_round(2).round.status == "completed"
        momentum = store.get_strategy_state("fedavgm")
        assert momentum is not None and momentum.round == 2 and momentum.state["steps"] == 2
    finally:
        store.close()
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and '"round": 1' in metrics[0] and '"round": 2' in metrics[1]
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["v000000", "v000001", "v000002"]
