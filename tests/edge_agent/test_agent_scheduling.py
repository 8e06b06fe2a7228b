"""The agent's scheduling (issue #5): when it trains, pauses, resumes, abandons and uploads.

Real digits bundle and onnxruntime, an in-process broker, a :class:`ScriptedMonitor` for the
sensors and a :class:`Policy` for the rules. Time never passes on its own: one fake clock serves
as the agent's wall clock, its monotonic clock (backoff, ``train_seconds``) and the monitor's, and
local time for the windows is a separate fake. A listener on the device's results and status
topics sees exactly what the agent published (in-memory delivery is synchronous).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import decode_update
from edge_agent.data import Dataset
from edge_agent.device.fake import ScriptedMonitor
from edge_agent.device.policy import MB, Budget, Policy, Window
from edge_agent.device.state import NetworkState
from edge_agent.gate import working_set
from edge_agent.presence import offline_will
from edge_agent.protocol.messages import StatusMessage, TaskMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.checkpoint import load_checkpoint
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.fixtures import digits_split

DEVICE = "sched-dev"
TOPICS = Topics()
SEED = 3
#: 160 examples in batches of 16: 10 steps per epoch, 20 steps per task
EPOCHS, BATCH = 2, 16
TOTAL_STEPS = 20
WIFI = NetworkState(interface="wlan0", kind="wifi", metered=False, link_up=True)
CELLULAR = NetworkState(interface="wwan0", kind="cellular", metered=True, link_up=True)
DAY = 86_400.0

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Wall and monotonic time at once; moves only when told to."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def data() -> Dataset:
    devices, _ = digits_split(2)
    return Dataset(devices[0].x[:160], devices[0].y[:160])


@dataclass
class Rig:
    """One device on an in-memory broker, plus a listener on its results and status topics."""

    bundle: Bundle
    data: Dataset
    state_dir: Path
    policy: Policy | None = field(default_factory=Policy)
    clock: Clock = field(default_factory=Clock)
    local: list[datetime] = field(default_factory=lambda: [datetime(2025, 6, 2, 12, 0)])
    broker: InMemoryBroker = field(default_factory=InMemoryBroker)

    def __post_init__(self) -> None:
        self.monitor = ScriptedMonitor(
            clock=self.clock, battery_percent=80.0, charging=False, memory_available_bytes=8 << 30, network=WIFI
        )
        self.listener = InMemoryTransport(self.broker, "listener")
        self.listener.start()
        self.listener.subscribe(TOPICS.results(DEVICE))
        self.listener.subscribe(TOPICS.status(DEVICE))
        self.agent = self.new_agent()
        self.agent.start()

    def new_agent(self) -> Agent:
        return Agent(
            AgentConfig(device_id=DEVICE, seed=SEED, state_dir=self.state_dir),
            InMemoryTransport(self.broker, DEVICE, will=offline_will(DEVICE)),
            OrtTrainer.open(self.bundle),
            self.data,
            clock=self.clock,
            wall_clock=self.clock,
            monitor=self.monitor,
            policy=self.policy,
            local_now=lambda: self.local[0],
        )

    def task(self, task_id: str = "t1", *, deadline_s: float = 3600.0) -> bytes:
        return encode_message(
            TaskMessage(
                device_id=DEVICE,
                round=1,
                task_id=task_id,
                model_version=0,
                bundle_digest=self.bundle.digest,
                epochs=EPOCHS,
                batch_size=BATCH,
                lr=0.05,
                deadline_s=deadline_s,
                weights=self.bundle.initial_weights(),
            )
        )

    def checkpoints(self) -> list[Path]:
        directory = self.state_dir / "checkpoints"
        return sorted(directory.glob("*.ckpt")) if directory.exists() else []

    def drain(self) -> tuple[list[UpdateMessage], list[StatusMessage]]:
        """Everything published since the last drain: (updates, statuses)."""
        updates, statuses = [], []
        while (inbound := self.listener.receive(timeout=0)) is not None:
            message = decode_message(inbound.payload)
            if isinstance(message, UpdateMessage):
                updates.append(message)
            else:
                assert isinstance(message, StatusMessage), message
                statuses.append(message)
        return updates, statuses

    def close(self) -> None:
        self.agent.close()
        self.listener.close()


@pytest.fixture
def rig(digits_bundle: Bundle, data: Dataset, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(digits_bundle, data, tmp_path / "device")
    rig.drain()  # the retained "online" status of start()
    yield rig
    rig.close()


def eligibility(statuses: list[StatusMessage]) -> list[dict[str, Any]]:
    return [s.eligibility for s in statuses if s.eligibility]


def codes(entry: dict[str, Any]) -> set[str]:
    return {reason["code"] for reason in entry["reasons"]}


def reference_update(bundle: Bundle, data: Dataset, task: bytes, state_dir: Path) -> UpdateMessage:
    """What an agent with the same seed produces when nothing interrupts it."""
    rig = Rig(bundle, data, state_dir, policy=None)
    try:
        rig.agent.handle_payload(task)
        updates, _ = rig.drain()
    finally:
        rig.close()
    assert len(updates) == 1
    return updates[0]


def test_battery_low_pauses_at_a_step_boundary_and_the_charger_resumes_it_bit_for_bit(
    rig: Rig, digits_bundle: Bundle, data: Dataset, tmp_path: Path
) -> None:
    # Samples 0 and 1 are the tick's and the eligible STATUS's; sample k >= 2 follows step k - 1,
    # so the first low reading (sample 7) follows step 6.
    rig.monitor.set(battery_percent=lambda _now: 80.0 if rig.monitor.samples < 7 else 20.0)
    task = rig.task()
    rig.agent.handle_payload(task)

    updates, statuses = rig.drain()
    assert updates == [] and rig.agent.tasks_done == 0
    assert rig.agent.store.sizes().pending_results == 0 and rig.agent.store.sizes().pending_tasks == 1
    [checkpoint_file] = rig.checkpoints()
    progress = load_checkpoint(checkpoint_file).progress
    assert progress.steps == 6 and progress.epoch == 0 and progress.batch == 6
    reported = eligibility(statuses)
    assert reported[0] == {"phase": "train", "eligible": True, "reasons": []}
    assert reported[-1]["phase"] == "continue" and not reported[-1]["eligible"]
    assert "battery_low" in codes(reported[-1]), reported[-1]
    assert statuses[-1].device_state["battery_percent"] == 20.0

    rig.agent.tick()  # still on battery: nothing moves
    assert rig.drain()[0] == [] and rig.checkpoints() == [checkpoint_file]
    assert load_checkpoint(checkpoint_file).progress.steps == 6

    rig.monitor.set(charging=True)
    rig.agent.tick()
    updates, statuses = rig.drain()
    assert eligibility(statuses)[-1]["eligible"]
    assert [u.attempt for u in updates] == [1] and rig.agent.tasks_done == 1
    assert rig.checkpoints() == []
    expected = reference_update(digits_bundle, data, task, tmp_path / "reference")
    resumed = updates[0]
    assert resumed.num_examples == expected.num_examples == len(data)
    assert resumed.metrics == expected.metrics  # train_seconds is 0 on both fake clocks
    shapes = {t.name: t.shape for t in digits_bundle.manifest.aggregated_tensors}
    got, want = decode_update(resumed.payload, shapes), decode_update(expected.payload, shapes)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[name], want[name]) for name in want)
    assert resumed.payload == expected.payload


def test_a_metered_network_keeps_the_result_in_the_outbox_until_wifi(rig: Rig) -> None:
    rig.monitor.set(network=CELLULAR)
    rig.agent.handle_payload(rig.task())
    updates, statuses = rig.drain()
    assert updates == []
    assert rig.agent.tasks_done == 1 and rig.agent.store.sizes().pending_tasks == 0  # trained anyway
    stored = rig.agent.store.get_result("t1")
    assert stored is not None and stored.attempts == 0 and stored.delivered_at is None
    last = eligibility(statuses)[-1]
    assert last["phase"] == "upload" and codes(last) == {"network_metered"}

    rig.clock.advance(60)
    rig.agent.tick()  # still cellular
    assert rig.drain()[0] == []

    rig.monitor.set(network=WIFI)
    rig.agent.tick()
    updates, _ = rig.drain()
    assert [(u.task_id, u.attempt) for u in updates] == [("t1", 1)]
    assert updates[0].payload == decode_message(stored.envelope).payload  # type: ignore[union-attr]
    delivered = rig.agent.store.get_result("t1")
    assert delivered is not None and delivered.delivered_at is not None


@pytest.mark.parametrize("late_by", [1.0, 400.0], ids=["before-purge", "after-purge"])
def test_a_deadline_that_passes_while_paused_abandons_the_task(
    rig: Rig, late_by: float, caplog: pytest.LogCaptureFixture
) -> None:
    """``before-purge``: the store's periodic purge (every 300 s) has not run yet when the agent
    next looks; ``after-purge``: it runs in that same tick and deletes the task first."""
    rig.monitor.set(battery_percent=lambda _now: 80.0 if rig.monitor.samples < 4 else 20.0)
    rig.agent.handle_payload(rig.task(deadline_s=100.0))
    assert rig.agent.tasks_done == 0 and len(rig.checkpoints()) == 1

    rig.clock.advance(100.0 + late_by)
    rig.monitor.set(charging=True)
    with caplog.at_level(logging.INFO):
        rig.agent.tick()
    updates, _ = rig.drain()
    assert updates == [] and rig.agent.tasks_done == 0
    assert rig.checkpoints() == []
    assert rig.agent.store.get_result("t1") is None and rig.agent.store.pending_tasks(rig.clock()) == []
    assert any("abandoned task t1" in r.getMessage() and "deadline" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_a_deadline_that_passes_during_training_abandons_the_task(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    def battery(_now: float) -> float:
        if rig.monitor.samples == 6:  # a step takes "200 s": the deadline passes mid-task
            rig.clock.advance(200.0)
        return 80.0

    rig.monitor.set(battery_percent=battery)
    with caplog.at_level(logging.WARNING):
        rig.agent.handle_payload(rig.task(deadline_s=100.0))
    assert rig.drain()[0] == [] and rig.agent.tasks_done == 0
    assert rig.checkpoints() == [] and rig.agent.store.get_result("t1") is None
    assert rig.agent.store.sizes().pending_tasks == 0
    assert any("abandoned task t1: its deadline passed" in r.getMessage() for r in caplog.records)


def test_a_spent_budget_keeps_the_second_task_waiting(digits_bundle: Bundle, data: Dataset, tmp_path: Path) -> None:
    rig = Rig(digits_bundle, data, tmp_path / "device", policy=Policy(budget=Budget(rounds=1, per="week")))
    try:
        rig.agent.handle_payload(rig.task("t1", deadline_s=30 * DAY))
        assert [u.task_id for u in rig.drain()[0]] == ["t1"]

        rig.clock.advance(3600)
        rig.agent.handle_payload(rig.task("t2", deadline_s=30 * DAY))
        updates, statuses = rig.drain()
        assert updates == [] and rig.agent.tasks_done == 1
        assert [t.task_id for t in rig.agent.store.pending_tasks(rig.clock())] == ["t2"]
        last = eligibility(statuses)[-1]
        assert last["phase"] == "train" and codes(last) == {"budget_exhausted"}
        assert "1/1 rounds per week used" in last["reasons"][0]["text"]

        rig.clock.advance(7 * DAY)  # the first participation leaves the window
        rig.agent.tick()
        assert [(u.task_id, u.attempt) for u in rig.drain()[0]] == [("t2", 1)]
        assert rig.agent.tasks_done == 2
    finally:
        rig.close()


def test_a_task_redelivered_after_its_result_was_delivered_is_answered_from_the_store(rig: Rig) -> None:
    task = rig.task()
    rig.agent.handle_payload(task)
    [first] = rig.drain()[0]
    rig.clock.advance(30)
    rig.agent.handle_payload(task)  # the broker's QoS 1 re-delivery
    [again] = rig.drain()[0]
    assert (first.attempt, again.attempt) == (1, 2)
    assert again.payload == first.payload and again.metrics == first.metrics
    assert rig.agent.tasks_done == 1 and len(rig.agent.store.participations(0.0)) == 1
    stored = rig.agent.store.get_result("t1")
    assert stored is not None and stored.attempts == 2 and stored.delivered_at is not None


def test_a_restarted_agent_sends_the_pending_result_on_its_first_tick(rig: Rig) -> None:
    rig.broker.close()  # the broker goes away before the result can leave
    rig.agent.handle_payload(rig.task())
    assert rig.agent.tasks_done == 1
    failed = rig.agent.store.get_result("t1")
    assert failed is not None and failed.attempts == 1 and failed.delivered_at is None
    rig.agent.close()

    rig.broker = InMemoryBroker()  # back, empty (no persistence)
    rig.listener = InMemoryTransport(rig.broker, "listener")
    rig.listener.start()
    rig.listener.subscribe(TOPICS.results(DEVICE))
    rig.agent = rig.new_agent()  # same state_dir, so the same store file
    rig.agent.start()
    rig.agent.tick()
    updates, _ = rig.drain()
    assert [(u.task_id, u.attempt) for u in updates] == [("t1", 2)]  # attempt numbers survive the restart
    assert updates[0].payload == decode_message(failed.envelope).payload  # type: ignore[union-attr]
    assert rig.agent.tasks_done == 0  # sent from the store, not retrained
    delivered = rig.agent.store.get_result("t1")
    assert delivered is not None and delivered.delivered_at is not None


def test_no_training_outside_the_window(digits_bundle: Bundle, data: Dataset, tmp_path: Path) -> None:
    rig = Rig(digits_bundle, data, tmp_path / "device", policy=Policy(windows=(Window.parse("22:00-06:00"),)))
    try:
        rig.agent.handle_payload(rig.task())
        updates, statuses = rig.drain()
        assert updates == [] and rig.agent.tasks_done == 0 and rig.checkpoints() == []
        assert rig.agent.store.sizes().pending_tasks == 1
        last = eligibility(statuses)[-1]
        assert last["phase"] == "train" and codes(last) == {"outside_window"}

        rig.local[0] = datetime(2025, 6, 2, 23, 30)
        rig.agent.tick()
        assert [u.task_id for u in rig.drain()[0]] == ["t1"]
    finally:
        rig.close()


def memory_for_batch(bundle: Bundle, batch: int) -> int:
    """Available memory at which the default policy fits exactly ``batch`` examples (see gate.py)."""
    work = working_set(bundle.manifest)
    return 128 * MB + work.fixed_bytes + (batch + 1) * work.bytes_per_example


def test_less_memory_at_resume_restarts_the_task_with_a_smaller_batch(
    rig: Rig, digits_bundle: Bundle, caplog: pytest.LogCaptureFixture
) -> None:
    """The paused run's batch no longer fits: training starts over (logged) instead of failing the task."""
    rig.monitor.set(battery_percent=lambda _now: 80.0 if rig.monitor.samples < 5 else 20.0)
    rig.agent.handle_payload(rig.task())
    [checkpoint_file] = rig.checkpoints()
    assert load_checkpoint(checkpoint_file).plan.batch_size == BATCH

    rig.monitor.set(charging=True, memory_available_bytes=memory_for_batch(digits_bundle, 8))
    with caplog.at_level(logging.WARNING):
        rig.agent.tick()
    [update] = rig.drain()[0]  # an UPDATE, not an ERROR
    assert isinstance(update, UpdateMessage) and update.metrics["batch_size"] == 8.0
    assert update.num_examples == len(rig.data) and rig.checkpoints() == []
    assert any("starts over" in r.getMessage() for r in caplog.records)


def test_more_memory_at_resume_keeps_the_paused_runs_batch(
    rig: Rig, digits_bundle: Bundle, data: Dataset, tmp_path: Path
) -> None:
    small = memory_for_batch(digits_bundle, 8)
    rig.monitor.set(
        memory_available_bytes=small, battery_percent=lambda _now: 80.0 if rig.monitor.samples < 5 else 20.0
    )
    task = rig.task()
    rig.agent.handle_payload(task)
    [checkpoint_file] = rig.checkpoints()
    assert load_checkpoint(checkpoint_file).plan.batch_size == 8

    rig.monitor.set(charging=True, memory_available_bytes=8 << 30)
    rig.agent.tick()
    [update] = rig.drain()[0]
    reference = Rig(digits_bundle, data, tmp_path / "reference")  # same policy, never short of power
    try:
        reference.monitor.set(charging=True, memory_available_bytes=small)
        reference.agent.handle_payload(task)
        [expected] = reference.drain()[0]
    finally:
        reference.close()
    assert update.metrics == expected.metrics and update.metrics["batch_size"] == 8.0
    assert update.payload == expected.payload


def test_checkpoints_of_any_task_id_stay_in_the_checkpoint_directory(rig: Rig, tmp_path: Path) -> None:
    """Task ids come from the server: one with path separators must not address files elsewhere."""
    task_id = "../../escaped/t1"
    rig.monitor.set(battery_percent=lambda _now: 80.0 if rig.monitor.samples < 5 else 20.0)
    rig.agent.handle_payload(rig.task(task_id))
    [checkpoint_file] = rig.checkpoints()
    assert sorted(tmp_path.rglob("*.ckpt")) == [checkpoint_file]
    assert load_checkpoint(checkpoint_file).plan.task_id == task_id

    rig.monitor.set(charging=True)
    rig.agent.tick()
    assert [u.task_id for u in rig.drain()[0]] == [task_id]
    assert list(tmp_path.rglob("*.ckpt")) == []
