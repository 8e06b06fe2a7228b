"""A short asynchronous (FedBuff) federation: real agent processes, real Mosquitto, real onnxruntime."""

from __future__ import annotations

import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from tests.fixtures import digits_split, write_npz
from tests.integration.test_end_to_end import server_transport, start_agent


@pytest.mark.timeout(300)
def test_fedbuff_makes_versions_from_real_agents_over_mosquitto(mosquitto, digits_bundle, tmp_path) -> None:
    devices, test = digits_split(3, alpha=0.5, seed=2)
    prefix = "async/v1"
    agents = [
        start_agent(
            mosquitto.url,
            digits_bundle.directory,
            write_npz(tmp_path / f"d{i}.npz", data),
            f"async-{i}",
            prefix,
            tmp_path / f"agent-{i}.log",
        )
        for i, data in enumerate(devices)
    ]
    evaluator = OrtTrainer.open(digits_bundle, threads=1)
    config = ServerConfig(
        mode="async",
        asynchronous={"buffer_size": 2, "concurrency": 3, "versions": 4},
        min_clients=3,
        wait_for_clients_s=60,
        round_timeout_s=60,
        local_epochs=1,
        topics=Topics(prefix),
    )
    server = FederatedServer(
        server_transport(mosquitto.url, "async-server"),
        digits_bundle,
        config,
        evaluator=lambda w: evaluator.evaluate(w, test.x, test.y),
        out_dir=tmp_path / "server",
    )
    try:
        server.start()
        results = server.run()
        server.close()
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=20)
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(3))
    assert [(r.model_version, r.completed, r.reported) for r in results] == [(v, True, 2) for v in (1, 2, 3, 4)], logs
    assert server.model_version == 4
    assert results[-1].test_accuracy is not None and server.baseline is not None
    assert results[-1].test_accuracy > server.baseline.accuracy, (server.baseline, results)
    assert {r.code for r in server.rejections} <= {"finished"}, list(server.rejections)
    assert len(list((tmp_path / "server" / "models").iterdir())) == 5
