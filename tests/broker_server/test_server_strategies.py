"""Server strategies wired into the real server over the in-memory transport.

Scripted devices (tests/broker_server/fake_fleet.py) send fixed updates, so every round's mean
delta is known and the global model each strategy makes can be computed independently with the
pure strategy classes; a last test trains real agents with the FedProx bundle.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from broker_server.strategies import AdamConfig, FedAdam, FedAvg, FedProx, FedProxConfig, plain_tensor_names
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.errors import ConfigError
from edge_agent.presence import offline_will
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.fake_fleet import FakeDevice, expected_mean, fake_fleet


@pytest.fixture(scope="module")
def bundle(mlp_bundle: Bundle) -> Bundle:
    return mlp_bundle  # exported once per session (tests/fixtures.py)


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "rounds": 2,
        "clients_per_round": 3,
        "min_clients": 3,
        "wait_for_clients_s": 10,
        "round_timeout_s": 20,
        "codecs": ("fp32",),
    }
    return ServerConfig(**{**base, **kw})  # type: ignore[arg-type]


def devices(broker: InMemoryBroker, bundle: Bundle) -> list[FakeDevice]:
    # different example counts, so the weighting matters
    return [FakeDevice(broker, f"dev-{i}", bundle, num_examples=n) for i, n in enumerate((5, 20, 40))]


def run_fleet(bundle: Bundle, server_config: ServerConfig, **server_kw: object) -> tuple[FederatedServer, list]:
    broker = InMemoryBroker()
    with fake_fleet(devices(broker, bundle)) as fleet:
        server = FederatedServer(InMemoryTransport(broker, "server"), bundle, server_config, **server_kw)  # type: ignore[arg-type]
        server.start()
        results = server.run()
        server.close()
    assert [r.completed for r in results] == [True] * server_config.rounds, results
    return server, fleet


def test_fedprox_mu_and_client_overrides_reach_every_task(bundle: Bundle) -> None:
    strategy = {"name": "fedprox", "mu": 0.25, "client_lr": 0.02, "local_epochs": 3}
    server, fleet = run_fleet(
        bundle, config(strategy=strategy, hyperparameters={"fedprox_mu": 0.9, "label_smoothing": 0.1}, lr=0.5)
    )
    tasks = [task for device in fleet for task in device.tasks]
    assert len(tasks) == 6 and sorted({t.round for t in tasks}) == [1, 2]
    for task in tasks:
        # the strategy's mu wins over the configured one; other configured values stay
        assert task.hyperparameters == {"fedprox_mu": 0.25, "label_smoothing": 0.1}
        assert (task.lr, task.epochs) == (0.02, 3)
    assert server.strategy.name == "fedprox"


def test_fedavg_sends_only_the_configured_hyperparameters(bundle: Bundle) -> None:
    _, fleet = run_fleet(bundle, config(rounds=1, hyperparameters={"label_smoothing": 0.1}, lr=0.5, local_epochs=4))
    for device in fleet:
        assert [(t.hyperparameters, t.lr, t.epochs) for t in device.tasks] == [({"label_smoothing": 0.1}, 0.5, 4)]


def test_hyperparameters_the_bundle_lacks_are_refused_before_connecting(bundle: Bundle) -> None:
    broker = InMemoryBroker()
    server = FederatedServer(
        InMemoryTransport(broker, "server"), bundle, config(hyperparameters={"class_weights": (1.0, 2.0, 3.0)})
    )
    with pytest.raises(ConfigError, match="class_weights"):
        server.start()
    assert broker.connected_clients() == []


def test_strategy_given_twice_or_badly_is_a_config_error(bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="either"):
        FederatedServer(
            InMemoryTransport(InMemoryBroker(), "s"), bundle, config(strategy={"name": "fedadam"}), strategy=FedAvg()
        )
    with pytest.raises(ConfigError, match="beta9"):
        config(strategy={"name": "fedadam", "beta9": 0.5})
    with pytest.raises(ConfigError, match="server_lr"):
        config(strategy={"name": "fedadam"}, server_lr=0.5)


def test_fedadam_changes_the_trajectory_and_averages_buffers_plainly(bundle: Bundle) -> None:
    specs = bundle.manifest.aggregated_tensors
    plain = plain_tensor_names(bundle.manifest)
    assert plain == {"1.running_mean", "1.running_var"}
    avg, fleet = run_fleet(bundle, config())
    adam, _ = run_fleet(bundle, config(strategy={"name": "fedadam", "server_lr": 0.05}))

    # the same updates (they do not depend on the model), through the pure strategies by hand
    ref_avg, ref_adam = FedAvg(), FedAdam(AdamConfig(server_lr=0.05))
    w_avg = w_adam = bundle.initial_weights()
    for round_ in (1, 2):
        mean = expected_mean(fleet, round_, specs)
        w_avg = ref_avg.apply(w_avg, mean, round=round_, plain=plain)
        w_adam = ref_adam.apply(w_adam, mean, round=round_, plain=plain)
    for spec in specs:
        np.testing.assert_allclose(avg.weights[spec.name], w_avg[spec.name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adam.weights[spec.name], w_adam[spec.name], rtol=1e-5, atol=1e-6)
        moved = np.abs(adam.weights[spec.name] - avg.weights[spec.name]).max()
        if spec.name in plain:  # buffers: exactly the average of the devices' values, whatever the strategy
            assert moved < 1e-6, spec.name
        else:
            assert moved > 1e-3, spec.name
    assert adam.strategy.state().meta["steps"] == 2 and adam.model_version == 2


def test_strategy_object_can_be_injected(bundle: Bundle) -> None:
    strategy = FedProx(FedProxConfig(mu=0.125))
    server, fleet = run_fleet(bundle, config(rounds=1), strategy=strategy)
    assert server.strategy is strategy and strategy.steps == 1
    assert {t.hyperparameters["fedprox_mu"] for d in fleet for t in d.tasks} == {0.125}


def test_real_agents_train_with_fedprox(bundle: Bundle, tmp_path: Path) -> None:
    broker = InMemoryBroker()
    rng = np.random.default_rng(0)
    stop, agents, threads = threading.Event(), [], []
    for i in range(2):
        data = Dataset(rng.standard_normal((24, 4)).astype(np.float32), rng.integers(0, 3, 24).astype(np.int64))
        agent = Agent(
            AgentConfig(device_id=f"agent-{i}", seed=i),
            InMemoryTransport(broker, f"agent-{i}", will=offline_will(f"agent-{i}")),
            OrtTrainer.open(bundle),
            data,
        )
        agent.start()
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True))
    for thread in threads:
        thread.start()
    try:
        server = FederatedServer(
            InMemoryTransport(broker, "server"),
            bundle,
            config(clients_per_round=2, min_clients=2, strategy={"name": "fedprox", "mu": 0.5}),
            out_dir=tmp_path,
        )
        server.start()
        results = server.run()
        server.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for agent in agents:
            agent.close()
    assert [(r.completed, r.reported, r.failed) for r in results] == [(True, 2, 0), (True, 2, 0)], results
    assert list(server.rejections) == []
    assert not np.allclose(server.weights["0.weight"], bundle.initial_weights()["0.weight"])
