"""Device selection in the real server: over-selection, declines, device classes, budgets."""

from __future__ import annotations

import time

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, expected_mean, fake_fleet


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def server_for(broker: InMemoryBroker, bundle: Bundle, **kw: object) -> FederatedServer:
    base: dict[str, object] = {"wait_for_clients_s": 10, "round_timeout_s": 30, "codecs": ("fp32",)}
    wall_clock = kw.pop("wall_clock", time.time)
    config = ServerConfig(**{**base, **kw})  # type: ignore[arg-type]
    server = FederatedServer(InMemoryTransport(broker, "server"), bundle, config, wall_clock=wall_clock)  # type: ignore[arg-type]
    server.start()
    return server


def test_over_selected_round_completes_with_the_first_updates_and_drops_late_ones(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    fast = [FakeDevice(broker, f"fast-{i}", bundle, num_examples=10 + i) for i in range(4)]
    slow = [FakeDevice(broker, f"slow-{i}", bundle, hold=True) for i in range(2)]
    with fake_fleet(fast + slow):
        server = server_for(broker, bundle, clients_per_round=4, over_selection=1.5, min_clients=6, rounds=1)
        result = server.run_round(1)
        deadline = time.monotonic() + 5  # the held devices' threads may not have read their TASK yet
        while [len(d.tasks) for d in slow] != [1, 1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [len(d.tasks) for d in fast + slow] == [1] * 6  # 6 tasks for a round that wants 4
        assert result.completed and (result.selected, result.reported) == (6, 4)
        assert result.duration_s < 10  # it did not wait for the stragglers' deadline
        assert result.num_examples == sum(d.num_examples for d in fast)
        after = {name: value.copy() for name, value in server.weights.items()}
        for name, mean in expected_mean(fast, 1, bundle.manifest.aggregated_tensors).items():
            np.testing.assert_allclose(after[name], bundle.initial_weights()[name] + mean, rtol=1e-5, atol=1e-6)
        for device in slow:
            device.release()  # their updates arrive after the round closed
        deadline = time.monotonic() + 5
        while server.late_updates < 2 and time.monotonic() < deadline:
            server.serve(0.1)
        server.close()
    assert server.late_updates == 2 and list(server.rejections) == []
    assert server.model_version == 1
    assert all(np.array_equal(server.weights[name], after[name]) for name in after)


def test_a_declining_device_is_never_sent_a_task(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    willing = [FakeDevice(broker, f"ok-{i}", bundle) for i in range(3)]
    decliner = FakeDevice(broker, "tired", bundle, declines=True)
    with fake_fleet([*willing, decliner]):
        server = server_for(broker, bundle, clients_per_round=4, over_selection=1.5, min_clients=3, rounds=3)
        results = server.run()
        server.close()
    assert [(r.completed, r.selected) for r in results] == [(True, 3)] * 3
    assert decliner.tasks == []
    assert all(len(d.tasks) == 3 for d in willing)


def test_stratified_selection_takes_every_device_class(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    phones = [FakeDevice(broker, f"phone-{i}", bundle, device_class="phone") for i in range(4)]
    gateways = [FakeDevice(broker, f"gw-{i}", bundle, device_class="gateway") for i in range(2)]
    unlabelled = FakeDevice(broker, "plain", bundle)
    with fake_fleet([*phones, *gateways, unlabelled]):
        server = server_for(broker, bundle, clients_per_round=3, stratify=True, min_clients=7, rounds=4)
        results = server.run()
        server.close()
    assert all(r.completed and r.selected == 3 for r in results)
    record = server.registry.get("gw-0")
    assert record is not None and record.device_class == "gateway"
    assert record.capabilities == {"device_class": "gateway"}
    assert server.registry.get("plain").device_class == "default"  # type: ignore[union-attr]
    for number in range(1, 5):
        chosen = {d.device_id for d in [*phones, *gateways, unlabelled] if any(t.round == number for t in d.tasks)}
        # 3 devices from 3 classes of sizes 4, 2 and 1: one from each
        assert len(chosen & {d.device_id for d in phones}) == 1, chosen
        assert len(chosen & {d.device_id for d in gateways}) == 1, chosen
        assert "plain" in chosen


def test_participation_budget_spreads_rounds_across_devices(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    now = [1000.0]
    fleet = [FakeDevice(broker, f"dev-{i}", bundle) for i in range(4)]
    with fake_fleet(fleet):
        server = server_for(
            broker,
            bundle,
            clients_per_round=2,
            min_clients=2,
            rounds=4,
            max_rounds_per_window=1,
            budget_window_s=100.0,
            wall_clock=lambda: now[0],
        )
        first, second = server.run_round(1), server.run_round(2)
        third = server.run_round(3)  # every device used its budget
        now[0] += 150.0  # the window moved past rounds 1 and 2
        fourth = server.run_round(4)
        server.close()
    by_round = {n: {d.device_id for d in fleet if any(t.round == n for t in d.tasks)} for n in (1, 2, 3, 4)}
    assert first.completed and second.completed and fourth.completed
    assert len(by_round[1]) == len(by_round[2]) == 2 and not by_round[1] & by_round[2]
    assert not third.completed and by_round[3] == set()
    assert "over their participation budget" in third.reason, third.reason
    assert len(by_round[4]) == 2
    assert server.model_version == 3
