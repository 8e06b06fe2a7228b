"""The rollout controller wired into the ModelPublisher, over the in-memory transport: directed
retained targets, FETCH gating, halt/rollback/widening from STATUS install reports, pins, the ops
view, and a restart that continues from the server store. Devices are scripted STATUS messages
(the agents themselves run in tests/integration/test_rollout_run.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_server.models import ModelPublisher
from broker_server.persistence.sqlite import SqliteServerStore
from broker_server.rollout import RolloutPlan
from broker_server.rollout_config import RolloutSettings, parse_rollout
from edge_agent.errors import ConfigError, ContractViolation
from edge_agent.protocol.messages import ErrorMessage, StatusMessage, decode_message
from edge_agent.protocol.model_messages import FetchMessage, ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transfer import TransferLink
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.edge_agent.ota import derive_bundle

TOPICS = Topics("rc/v1")
DEVICES = [f"dev-{i:02d}" for i in range(40)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def bundles(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("rc")
    return {1: digits_bundle.directory, 2: derive_bundle(digits_bundle.directory, root / "v2", scale=0.5)}


class Fleet:
    """A publisher with rollout settings on an in-memory broker, and scripted device STATUS."""

    def __init__(self, bundles: dict[int, Path], table: dict[str, Any], store: SqliteServerStore | None = None):
        self.bundles, self.clock = bundles, Clock()
        self.broker = InMemoryBroker()
        self.server = InMemoryTransport(self.broker, "server")
        self.server.start()
        self.link = TransferLink(self.server)
        self.digest = {v: Bundle.open(d).digest for v, d in bundles.items()}
        self.table, self.store = table, store
        self.publisher = self.new_publisher()

    def new_publisher(self) -> ModelPublisher:
        settings = parse_rollout(self.table)
        return ModelPublisher(TOPICS, rollout=settings, store=self.store, clock=self.clock)

    def status(self, device: str, running: int, device_class: str = "phone", **install: Any) -> None:
        status = StatusMessage(
            device_id=device,
            online=True,
            bundle_digest=self.digest[running],
            capabilities={"device_class": device_class},
            install=install,
        )
        self.publisher.observe(self.server, status)

    def installed(self, device: str, version: int, previous: int, **metrics: Any) -> None:
        """STATUS after an install of ``version`` replacing ``previous``, with validation metrics."""
        self.status(
            device,
            version,
            ok=True,
            version=version,
            stage="done",
            digest=self.digest[version],
            previous_digest=self.digest[previous],
            metrics=metrics.get("new", {}),
            previous_metrics=metrics.get("old", {}),
        )

    def directed(self) -> dict[str, int]:
        """Device -> version of the retained directed MODEL on its inbox."""
        out = {}
        for topic, payload in self.broker.retained().items():
            if topic.endswith("/tasks") and payload:
                model = decode_message(payload)
                assert isinstance(model, ModelMessage) and model.channel == topic.split("/")[-2]
                out[model.channel] = model.version
        return out

    def channel(self) -> int:
        model = decode_message(self.broker.retained()[TOPICS.model_channel("current")])
        assert isinstance(model, ModelMessage)
        return model.version

    def fetch(self, device: str, version: int) -> str:
        fetch = FetchMessage(device_id=device, channel=device, version=version, chunk_size=64 * 1024)
        return self.publisher.handle_fetch(fetch, self.link)


@pytest.fixture
def plan_of() -> Iterator[Any]:
    yield lambda fleet: fleet.publisher.rollout.state.plan


def started(bundles: dict[int, Path], table: dict[str, Any], store: SqliteServerStore | None = None) -> Fleet:
    fleet = Fleet(bundles, table, store)
    fleet.publisher.announce(fleet.server, "current", 1, bundles[1])
    for device in DEVICES:
        fleet.status(device, 1)
    fleet.publisher.start_rollout(fleet.server, 2, bundles[2], rollout_id="r-test")
    return fleet


def cohort(stage: int, table: dict[str, Any]) -> set[str]:
    settings = parse_rollout(table)
    assert settings is not None
    plan: RolloutPlan = settings.plan("r-test", 2, 1)
    return {d for d in DEVICES if plan.cohort(d) <= stage}


TABLE: dict[str, Any] = {"stages": [25, 60, 100], "max_install_failure_percent": 20, "min_install_reports": 3}


def test_only_the_canary_is_directed_and_may_fetch_the_new_version(bundles: dict[int, Path]) -> None:
    fleet = started(bundles, TABLE)
    canary = cohort(0, TABLE)
    assert 3 <= len(canary) < len(DEVICES) // 2  # ~25 % of 40

    assert fleet.directed() == dict.fromkeys(sorted(canary), 2)
    assert fleet.channel() == 1  # the channel keeps announcing the baseline
    inside, outside = sorted(canary)[0], sorted(set(DEVICES) - canary)[0]
    assert fleet.fetch(inside, 2)
    listener = InMemoryTransport(fleet.broker, "probe")
    listener.subscribe(TOPICS.tasks(outside))
    listener.start()
    with pytest.raises(ContractViolation, match=r"not dev-\d+'s target"):
        fleet.fetch(outside, 2)
    inbound = listener.receive(timeout=1)  # the refusal is on the device's inbox (no retained target)
    assert inbound is not None and isinstance(error := decode_message(inbound.payload), ErrorMessage)
    assert error.code == "contract_violation" and error.task_id == "model-v2"
    assert fleet.fetch(outside, 1)  # the baseline stays available to everybody
    assert fleet.publisher.counters["not_targeted"] == 1


def test_install_failures_in_the_canary_roll_back_to_the_baseline(bundles: dict[int, Path]) -> None:
    fleet = started(bundles, TABLE)
    canary = sorted(cohort(0, TABLE))
    for device in canary[:3]:
        fleet.status(device, 1, ok=False, version=2, stage="validate", reason="non-finite loss", digest=None)

    view = fleet.publisher.rollout_status()
    assert view is not None and view["status"] == "rolled_back" and view["percent"] == 0
    assert view["installs"] == {"ok": 0, "failed": 3}
    assert view["decisions"][-1]["kind"] == "rollback" and "3/3 installs of v2 failed" in view["reason"]
    assert fleet.directed() == dict.fromkeys(canary, 1)  # the canary is sent back
    assert fleet.channel() == 1
    with pytest.raises(ContractViolation):
        fleet.fetch(canary[0], 2)
    assert fleet.fetch(canary[0], 1)


def test_a_device_rolling_the_new_version_back_itself_counts_as_a_failed_install(bundles: dict[int, Path]) -> None:
    fleet = started(bundles, TABLE | {"min_install_reports": 1, "max_install_failure_percent": 50})
    device = sorted(cohort(0, TABLE))[0]
    fleet.installed(device, 2, 1)
    assert fleet.publisher.rollout_status()["installs"] == {"ok": 1, "failed": 0}  # type: ignore[index]

    # agent-side rollback after non_finite_loss: ok, now on the baseline bundle, previous = v2
    fleet.status(device, 1, ok=True, version=0, stage="done", digest=fleet.digest[1], previous_digest=fleet.digest[2])

    view = fleet.publisher.rollout_status()
    assert view is not None and view["installs"] == {"ok": 0, "failed": 1} and view["status"] == "rolled_back"


def test_a_metric_drop_halts_without_widening_until_resumed(bundles: dict[int, Path]) -> None:
    table = {"stages": [25, 100], "max_metric_drop": 0.1, "on_problem": "halt", "min_eval_reports": 2}
    fleet = started(bundles, table)
    canary = sorted(cohort(0, table))
    for device in canary[:2]:
        fleet.installed(device, 2, 1, new={"accuracy": 0.30, "loss": 2.0}, old={"accuracy": 0.90, "loss": 0.3})

    view = fleet.publisher.rollout_status()
    assert view is not None and view["status"] == "halted" and view["stage"] == 0
    assert view["canary_metric"] == pytest.approx(0.30) and view["baseline_metric"] == pytest.approx(0.90)
    assert "accuracy of v2 is 0.3 vs baseline 0.9" in view["reason"]
    fleet.clock.now += 100
    fleet.publisher.tick(fleet.server)
    assert fleet.publisher.rollout_status()["stage"] == 0  # type: ignore[index]
    assert fleet.directed() == dict.fromkeys(canary, 2)  # a halt keeps the canary where it is

    assert fleet.publisher.rollout is not None
    fleet.publisher.rollout.resume(fleet.server)
    assert fleet.publisher.rollout_status()["status"] == "active"  # type: ignore[index]


def test_a_healthy_rollout_widens_stage_by_stage_and_completes(bundles: dict[int, Path]) -> None:
    table = {"stages": [25, 60, 100], "min_soak_s": 30, "max_metric_drop": 0.05, "metric": "loss"}
    fleet = started(bundles, table)
    for stage in range(3):
        members = sorted(cohort(stage, table))
        assert set(fleet.directed()) == set(members)  # everybody targeted so far, nobody else
        for device in members:
            fleet.installed(device, 2, 1, new={"loss": 0.50}, old={"loss": 0.52})
        fleet.clock.now += 10
        fleet.publisher.tick(fleet.server)
        assert fleet.publisher.rollout_status()["stage"] == stage  # type: ignore[index]  # still soaking
        fleet.clock.now += 25
        fleet.publisher.tick(fleet.server)

    view = fleet.publisher.rollout_status()
    assert view is not None and view["status"] == "complete" and view["percent"] == 100
    assert [d["kind"] for d in view["decisions"]] == ["advance", "advance", "advance", "complete"]
    assert view["devices_per_version"] == {"2": len(DEVICES)}
    assert fleet.channel() == 2  # devices that come later get it from the channel
    assert fleet.publisher.announced("current") == 2


def test_a_pinned_class_keeps_its_version(bundles: dict[int, Path]) -> None:
    table = {"stages": [100], "pins": {"kiosk": 1}}
    fleet = Fleet(bundles, table)
    fleet.publisher.announce(fleet.server, "current", 1, bundles[1])
    fleet.status("kiosk-1", 1, device_class="kiosk")
    fleet.status("phone-1", 1)
    fleet.publisher.start_rollout(fleet.server, 2, bundles[2])
    assert fleet.directed() == {"phone-1": 2}
    fleet.installed("phone-1", 2, 1)
    fleet.publisher.tick(fleet.server)

    assert fleet.publisher.rollout_status()["status"] == "complete"  # type: ignore[index]
    assert fleet.channel() == 2
    assert fleet.directed() == {"phone-1": 2, "kiosk-1": 1}  # the pin now differs from the channel
    with pytest.raises(ContractViolation):
        fleet.fetch("kiosk-1", 2)


def test_a_restarted_server_continues_the_rollout_from_its_store(bundles: dict[int, Path], tmp_path: Path) -> None:
    table = {"stages": [25, 60, 100], "min_devices": 2, "min_soak_s": 60}
    store = SqliteServerStore.open(tmp_path / "server.db")
    try:
        fleet = started(bundles, table, store)
        for device in sorted(cohort(0, table)):
            fleet.installed(device, 2, 1)
        fleet.clock.now += 61
        fleet.publisher.tick(fleet.server)
        assert fleet.publisher.rollout_status()["stage"] == 1  # type: ignore[index]

        fleet.publisher = fleet.new_publisher()  # the restart: nothing held in memory
        assert fleet.publisher.announced("current") == 1  # so the server does not announce its own
        view = fleet.publisher.rollout_status()
        assert view is not None and view["rollout_id"] == "r-test" and view["stage"] == 1
        assert [d["kind"] for d in view["decisions"]] == ["advance", "advance"]
        outside = sorted(set(DEVICES) - cohort(1, table))[0]
        with pytest.raises(ContractViolation):
            fleet.fetch(outside, 2)
        assert fleet.fetch(sorted(cohort(1, table))[0], 2)  # v2's bundle is held again
        fleet.broker._retained.clear()  # a broker that lost its retained messages
        fleet.publisher.tick(fleet.server)
        assert fleet.channel() == 1
    finally:
        store.close()


def test_a_plain_announce_is_refused_while_a_rollout_runs_and_ends_a_finished_one(bundles: dict[int, Path]) -> None:
    fleet = started(bundles, TABLE)
    with pytest.raises(ConfigError, match="rollout running"):
        fleet.publisher.announce(fleet.server, "current", 2)
    with pytest.raises(ConfigError, match="is v1 -> v2 active"):
        fleet.publisher.start_rollout(fleet.server, 2)
    assert fleet.publisher.rollout is not None
    fleet.publisher.rollout.rollback(fleet.server, "operator")
    canary = sorted(cohort(0, TABLE))
    assert fleet.directed() == dict.fromkeys(canary, 1)

    fleet.publisher.announce(fleet.server, "current", 2)
    assert fleet.channel() == 2 and fleet.directed() == dict.fromkeys(canary, 2)
    assert fleet.publisher.rollout_status() == {
        "channel": "current",
        "active": False,
        "decisions": [*fleet.publisher.rollout.decisions],
    }


def test_without_rollout_settings_nothing_changes(bundles: dict[int, Path]) -> None:
    broker = InMemoryBroker()
    server = InMemoryTransport(broker, "server")
    server.start()
    publisher = ModelPublisher(TOPICS)
    publisher.announce(server, "current", 1, bundles[1])
    publisher.observe(server, StatusMessage(device_id="d", online=True))
    with pytest.raises(ConfigError, match="no rollout settings"):
        publisher.start_rollout(server, 2, bundles[2])
    assert publisher.rollout_status() is None
    assert [t for t in broker.retained() if t.endswith("/tasks")] == []
    fetch = FetchMessage(device_id="d", channel="current", version=1, chunk_size=64 * 1024)
    assert publisher.handle_fetch(fetch, TransferLink(server))


def test_rollout_settings_defaults() -> None:
    settings = parse_rollout({})
    assert settings == RolloutSettings()
    assert parse_rollout(None) is None
