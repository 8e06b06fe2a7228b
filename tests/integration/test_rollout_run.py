"""Staged rollout end to end: a real Mosquitto, a FederatedServer with a ``rollout`` table, and
real agents (in-process, each on its own thread and MQTT connection, with a real model store,
staged downloads and onnxruntime validation).

* a deliberately broken model (weights scaled 40x: finite but enormous loss) goes to the canary;
  the canary's validation loss makes the server roll back: the canary devices are directed back
  to the baseline and install it again, and the devices outside the canary never FETCH v2;
* a model whose loss is not finite fails every canary install (validation): the rollout halts,
  nobody switches, and nobody outside the canary fetches it;
* a healthy model widens stage by stage to the whole fleet, except a pinned device class.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent
from edge_agent.agent_config import AgentConfig
from edge_agent.data import Dataset
from edge_agent.ota import DownloadStaging, ModelStore, ModelUpdater, UpdaterConfig
from edge_agent.ota.validation import evaluation_validator
from edge_agent.presence import offline_will, online_birth
from edge_agent.protocol.messages import decode_message
from edge_agent.protocol.model_messages import FetchMessage
from edge_agent.protocol.topics import RESULTS, Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from edge_agent.transport.mqtt_config import parse_mqtt_url
from tests.edge_agent.ota import derive_bundle
from tests.fixtures import digits_split

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@dataclass
class Device:
    device_id: str
    store: ModelStore
    agent: Agent
    thread: threading.Thread

    def running(self) -> str:
        return self.agent.runner.trainer.bundle.digest


class Rig:
    def __init__(self, url: str, bundle: Bundle, root: Path, rollout: dict[str, Any]) -> None:
        self.url, self.bundle, self.root = url, bundle, root
        run = uuid.uuid4().hex[:8]
        self.run, self.topics = run, Topics(f"rollout-{run}/v1")
        self.stop = threading.Event()
        self.devices: dict[str, Device] = {}
        self.fetches: list[FetchMessage] = []
        config = ServerConfig(topics=self.topics, rollout=rollout)
        self.server_transport = self.transport(f"server-{run}")
        self.server = FederatedServer(self.server_transport, bundle, config)
        self.spy = self.transport(f"spy-{run}")  # sees every FETCH the devices send
        self.spy.subscribe(self.topics.all_devices(RESULTS), qos=1)

    def transport(self, client_id: str, **options: Any) -> MqttTransport:
        host, port = parse_mqtt_url(self.url)
        return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id, **options))

    def start(self, count: int, data: list[Dataset], device_class: Callable[[int], str]) -> None:
        self.server.start()  # announces the bundle as v1 on "current"
        self.spy.start()
        validation = data[0]  # every device validates on the same held-out rows: comparable metrics
        for i in range(count):
            self.add_device(f"d{i}-{self.run}", device_class(i), data[i % len(data)], validation)
        self.pump_until(lambda: len(self.server.registry.eligible(self.bundle.digest)) == count, "devices online")

    def add_device(self, device_id: str, device_class: str, data: Dataset, validation: Dataset) -> None:
        root = self.root / device_id
        validate = evaluation_validator(validation.x, validation.y)
        store = ModelStore(root / "models").open()
        assert store.install_directory(0, self.bundle.directory, validate=validate).ok
        transport = self.transport(
            device_id,
            will=offline_will(device_id, self.topics),
            birth=online_birth(device_id, self.bundle.digest, len(data), self.topics, device_class=device_class),
        )
        updater = ModelUpdater(
            device_id,
            self.topics,
            store,
            DownloadStaging(root / "downloads"),
            validate,
            config=UpdaterConfig(fetch_timeout_s=2.0, max_backoff_s=4.0),
        )
        agent = Agent(
            AgentConfig(device_id=device_id, device_class=device_class, topics=self.topics, state_dir=root / "state"),
            transport,
            OrtTrainer.open(Bundle.open(self.bundle.directory), lazy=True),
            data,
            updater=updater,
        )
        agent.start()
        thread = threading.Thread(target=agent.run, args=(self.stop,), kwargs={"poll_s": 0.05}, daemon=True)
        thread.start()
        self.devices[device_id] = Device(device_id, store, agent, thread)

    def pump_until(self, done: Callable[[], bool], what: str, timeout_s: float = 25.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: {self.server.publisher.rollout_status()}"
            )
            self.server.serve(0.05)
            while (inbound := self.spy.receive(timeout=0)) is not None:
                message = decode_message(inbound.payload)
                if isinstance(message, FetchMessage):
                    self.fetches.append(message)

    def on_version(self, digest: str, devices: set[str]) -> bool:
        return all(self.devices[d].running() == digest for d in devices)

    def close(self) -> None:
        self.stop.set()
        for device in self.devices.values():
            device.thread.join(timeout=10)
            device.agent.close()
        self.spy.close()
        self.server.close()


@pytest.fixture
def digits_data() -> list[Dataset]:
    devices, _ = digits_split(3)
    return devices


def rollout_id_with_canary(devices: list[str], percent: float, size: int) -> str:
    """A rollout id whose first stage (``percent``) holds exactly ``size`` of ``devices``."""
    from broker_server.rollout import cohort_bucket

    for n in range(10_000):
        rid = f"r{n}"
        if sum(cohort_bucket(rid, d) < percent for d in devices) == size:
            return rid
    raise AssertionError("no such rollout id")


@pytest.fixture
def rig_factory(mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(rollout: dict[str, Any]) -> Rig:
        rigs.append(Rig(mosquitto.url, digits_bundle, tmp_path, rollout))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def test_a_broken_model_in_the_canary_is_rolled_back_and_never_reaches_the_rest(
    rig_factory: Callable[..., Rig], digits_bundle: Bundle, digits_data: list[Dataset], tmp_path: Path
) -> None:
    rollout = {"stages": [30, 100], "metric": "loss", "max_metric_drop": 1.0, "min_eval_reports": 2}
    rig = rig_factory(rollout)
    rig.start(6, digits_data, lambda i: "phone")
    ids = sorted(rig.devices)
    rid = rollout_id_with_canary(ids, 30, 2)
    broken = Bundle.open(derive_bundle(digits_bundle.directory, tmp_path / "broken", scale=40.0))

    rig.server.publisher.start_rollout(rig.server_transport, 2, broken.directory, rollout_id=rid)
    rig.pump_until(lambda: (rig.server.publisher.rollout_status() or {}).get("status") == "rolled_back", "rollback")

    view = rig.server.publisher.rollout_status()
    assert view is not None and "loss of v2" in view["reason"], view
    assert view["canary_metric"] > view["baseline_metric"] + 1.0, view
    canary = {d for d in ids if rig.server.publisher.rollout.state.plan.cohort(d) == 0}  # type: ignore[union-attr]
    assert len(canary) == 2
    rig.pump_until(lambda: rig.on_version(digits_bundle.digest, set(ids)), "the canary back on the baseline")
    for device_id in canary:  # they ran v2, then installed v1 again on the server's order
        current, previous = rig.devices[device_id].store.current(), rig.devices[device_id].store.previous()
        assert current is not None and (current.version, current.digest) == (1, digits_bundle.digest)
        assert previous is not None and (previous.version, previous.digest) == (2, broken.digest)
    fetched_v2 = {f.device_id for f in rig.fetches if f.version == 2}
    assert fetched_v2 == canary  # nobody outside the canary asked for the broken version
    for device_id in set(ids) - canary:
        current = rig.devices[device_id].store.current()
        assert current is not None and current.version == 0  # untouched
    assert list(rig.server.rejections) == []


def test_a_healthy_model_widens_to_the_whole_fleet_except_a_pinned_class(
    rig_factory: Callable[..., Rig], digits_bundle: Bundle, digits_data: list[Dataset], tmp_path: Path
) -> None:
    rollout = {
        "stages": [{"percent": 30, "min_devices": 1}, {"percent": 100, "min_devices": 4}],
        "metric": "loss",
        "max_metric_drop": 0.5,
        "max_install_failure_percent": 0,
        "pins": {"kiosk": 1},
    }
    rig = rig_factory(rollout)
    rig.start(6, digits_data, lambda i: "kiosk" if i == 5 else "phone")
    ids = sorted(rig.devices)
    kiosk = next(d for d in ids if d.startswith("d5-"))
    healthy = Bundle.open(derive_bundle(digits_bundle.directory, tmp_path / "healthy", scale=0.9))
    rid = rollout_id_with_canary([d for d in ids if d != kiosk], 30, 2)

    rig.server.publisher.start_rollout(rig.server_transport, 2, healthy.directory, rollout_id=rid)
    rig.pump_until(lambda: (rig.server.publisher.rollout_status() or {}).get("status") == "complete", "completion")

    view = rig.server.publisher.rollout_status()
    assert view is not None and [d["kind"] for d in view["decisions"]] == ["advance", "advance", "complete"], view
    rig.pump_until(lambda: rig.on_version(healthy.digest, set(ids) - {kiosk}), "the fleet on v2")
    assert rig.devices[kiosk].running() == digits_bundle.digest
    assert kiosk not in {f.device_id for f in rig.fetches}  # pinned: never asked for anything
    assert rig.server.publisher.announced("current") == 2
    counts = {"1": 1, "2": 5}  # the ops view, from the devices' STATUS (which may trail the switch)
    rig.pump_until(lambda: (rig.server.publisher.rollout_status() or {}).get("devices_per_version") == counts, "STATUS")


def test_a_model_with_a_non_finite_loss_fails_in_the_canary_and_halts_the_rollout(
    rig_factory: Callable[..., Rig], digits_bundle: Bundle, digits_data: list[Dataset], tmp_path: Path
) -> None:
    rollout = {"stages": [30, 100], "max_install_failure_percent": 10, "min_install_reports": 2, "on_problem": "halt"}
    rig = rig_factory(rollout)
    rig.start(6, digits_data, lambda i: "phone")
    ids = sorted(rig.devices)
    rid = rollout_id_with_canary(ids, 30, 2)
    broken = Bundle.open(derive_bundle(digits_bundle.directory, tmp_path / "inf", scale=1e38))

    rig.server.publisher.start_rollout(rig.server_transport, 2, broken.directory, rollout_id=rid)
    rig.pump_until(lambda: (rig.server.publisher.rollout_status() or {}).get("status") == "halted", "halt")

    view = rig.server.publisher.rollout_status()
    assert view is not None and view["installs"] == {"ok": 0, "failed": 2} and view["stage"] == 0, view
    assert "2/2 installs of v2 failed" in view["reason"]
    rig.server.serve(1.0)
    assert rig.on_version(digits_bundle.digest, set(ids))
    canary = {d for d in ids if rig.server.publisher.rollout.state.plan.cohort(d) == 0}  # type: ignore[union-attr]
    assert {f.device_id for f in rig.fetches if f.version == 2} == canary
    for device_id in ids:
        current = rig.devices[device_id].store.current()
        assert current is not None and current.version == 0
