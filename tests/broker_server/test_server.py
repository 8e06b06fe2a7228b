"""The FedAvg server with real agents (onnxruntime) over the in-memory transport."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.presence import offline_will
from edge_agent.protocol.messages import StatusMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.fixtures import digits_split


@pytest.fixture
def fleet(digits_bundle) -> Iterator[tuple[InMemoryBroker, list[Agent], object]]:
    broker = InMemoryBroker()
    devices, test = digits_split(4)
    stop = threading.Event()
    agents, threads = [], []
    for number, data in enumerate(devices):
        device_id = f"mem-{number}"
        transport = InMemoryTransport(broker, device_id, will=offline_will(device_id))
        agent = Agent(AgentConfig(device_id=device_id, seed=number), transport, OrtTrainer.open(digits_bundle), data)
        agent.start()
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True))
    for thread in threads:
        thread.start()
    yield broker, agents, test
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    for agent in agents:
        agent.close()


def test_rounds_train_aggregate_evaluate_and_store_every_version(fleet, digits_bundle, tmp_path) -> None:
    broker, _, test = fleet
    evaluator = OrtTrainer.open(digits_bundle, threads=2)
    server = FederatedServer(
        InMemoryTransport(broker, "server"),
        digits_bundle,
        ServerConfig(rounds=4, clients_per_round=3, min_clients=4, wait_for_clients_s=10, round_timeout_s=30, lr=0.05),
        out_dir=tmp_path,
        evaluator=lambda w: evaluator.evaluate(w, test.x, test.y),
    )
    initial = digits_bundle.initial_weights()
    server.start()
    before = evaluator.evaluate(initial, test.x, test.y).accuracy
    results = server.run()
    server.close()
    assert [r.completed for r in results] == [True] * 4
    assert all(r.reported == 3 and r.selected == 3 for r in results)
    accuracies = [r.test_accuracy for r in results]
    assert accuracies[-1] > max(before, 0.3), accuracies
    assert server.model_version == 4
    stored = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert stored == [f"v{v:06d}" for v in range(5)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4]
    # running statistics of BatchNorm are aggregated too
    name = next(t.name for t in digits_bundle.manifest.tensors if t.name.endswith("running_mean"))
    assert not np.allclose(server.weights[name], initial[name])


def test_round_is_abandoned_cleanly_when_too_few_devices_report(digits_bundle, tmp_path) -> None:
    broker = InMemoryBroker()
    ghost = InMemoryTransport(broker, "ghost")  # online, holds the bundle, never trains
    ghost.start()
    ghost.publish(
        Topics().status("ghost"),
        encode_message(
            StatusMessage(device_id="ghost", online=True, bundle_digest=digits_bundle.digest, num_examples=5)
        ),
        retain=True,
    )
    clock = iter(np.arange(0, 1000, 0.5)).__next__
    server = FederatedServer(
        InMemoryTransport(broker, "server"),
        digits_bundle,
        ServerConfig(rounds=1, clients_per_round=1, min_clients=1, round_timeout_s=5),
        out_dir=tmp_path,
        clock=lambda: float(clock()),
    )
    server.start()
    result = server.run_round(1)
    server.close()
    assert not result.completed and "0 updates" in result.reason
    assert server.model_version == 0
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["v000000"]


def test_offline_devices_are_not_selected(digits_bundle) -> None:
    broker = InMemoryBroker()
    device = InMemoryTransport(broker, "gone", will=offline_will("gone"))
    device.start()
    device.publish(
        Topics().status("gone"),
        encode_message(StatusMessage(device_id="gone", online=True, bundle_digest=digits_bundle.digest)),
        retain=True,
    )
    device.kill()  # the broker publishes the retained offline will
    server = FederatedServer(InMemoryTransport(broker, "server"), digits_bundle, ServerConfig(min_clients=1))
    server.start()
    assert server.wait_for_devices(1, timeout_s=0.3) == []
    assert server.registry.get("gone") is not None and not server.registry.get("gone").online
    server.close()


def test_agent_answers_a_redelivered_task_with_the_same_result(digits_bundle) -> None:
    broker = InMemoryBroker()
    devices, _ = digits_split(2)
    agent = Agent(
        AgentConfig(device_id="dup"), InMemoryTransport(broker, "dup"), OrtTrainer.open(digits_bundle), devices[0]
    )
    listener = InMemoryTransport(broker, "listener")
    listener.start()
    listener.subscribe(Topics().results("dup"))
    agent.start()
    from edge_agent.protocol.messages import TaskMessage

    task = encode_message(
        TaskMessage(
            device_id="dup",
            round=1,
            task_id="t1",
            model_version=0,
            bundle_digest=digits_bundle.digest,
            epochs=1,
            batch_size=16,
            lr=0.05,
            deadline_s=30,
            weights=digits_bundle.initial_weights(),
        )
    )
    agent.handle_payload(task)
    agent.handle_payload(task)
    first, second = listener.receive(2), listener.receive(2)
    assert first is not None and second is not None
    assert agent.tasks_done == 1
    update, again = decode_message(first.payload), decode_message(second.payload)
    assert isinstance(update, UpdateMessage) and update.num_examples == len(devices[0])
    # the stored result, not a retrained one, sent as a new attempt (same task: counted once)
    assert isinstance(again, UpdateMessage) and again.payload == update.payload
    assert (update.attempt, again.attempt) == (1, 2)


def test_agent_reports_a_bundle_mismatch_as_an_error(digits_bundle) -> None:
    from edge_agent.protocol.messages import ErrorMessage, TaskMessage

    devices, _ = digits_split(2)
    agent = Agent(
        AgentConfig(device_id="d"), InMemoryTransport(InMemoryBroker(), "d"), OrtTrainer.open(digits_bundle), devices[0]
    )
    reply = agent.execute(
        TaskMessage(
            device_id="d",
            round=1,
            task_id="t",
            model_version=0,
            bundle_digest="0" * 64,
            epochs=1,
            batch_size=8,
            lr=0.1,
            deadline_s=1,
            weights=digits_bundle.initial_weights(),
        )
    )
    assert isinstance(reply, ErrorMessage) and reply.code == "protocol_error" and "bundle" in reply.reason


def test_server_config_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        ServerConfig(rounds=0)
    with pytest.raises(ConfigError):
        ServerConfig(clients_per_round=2, min_reports=3)


def test_counted_updates_rejections_and_aggregation_time_reach_the_metrics(fleet, digits_bundle) -> None:
    from broker_server.ops import ServerMetrics
    from fedflock.broker_cli import observe_round

    broker, _, _ = fleet
    metrics = ServerMetrics()
    server = FederatedServer(
        InMemoryTransport(broker, "server"),
        digits_bundle,
        ServerConfig(rounds=2, clients_per_round=3, min_clients=4, wait_for_clients_s=10, round_timeout_s=30),
        events=metrics,
    )
    server.start()
    forger = InMemoryTransport(broker, "forger")
    forger.start()
    forger.publish(Topics().results("mem-0"), b"not an envelope", qos=1)
    results = server.run(on_round=lambda result: observe_round(server, metrics, result))
    server.close()
    text = metrics.render()
    assert all(r.completed and r.aggregation_s is not None and r.aggregation_s >= 0 for r in results)
    counted = sum(r.reported for r in results)
    assert counted == 6
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert sum(v for k, v in lines.items() if k.startswith("fedflock_updates_accepted_total")) == counted
    assert lines['fedflock_updates_rejected_total{reason="malformed_message"}'] == 1
    assert lines["fedflock_aggregation_seconds_count"] == 2
