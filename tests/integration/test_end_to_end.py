"""Export -> 3 agent processes -> FedAvg server, over a real Mosquitto process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url
from tests.fixtures import digits_split, write_npz

REPO = Path(__file__).resolve().parents[2]


def start_agent(
    url: str, bundle: Path, data: Path, device_id: str, prefix: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "fedflock",
        "agent",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--device-id",
        device_id,
        "--mqtt-url",
        url,
        "--topic-prefix",
        prefix,
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def server_transport(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


@pytest.mark.timeout(240)
def test_federated_training_over_real_mosquitto(mosquitto, digits_bundle, tmp_path) -> None:
    devices, test = digits_split(3, alpha=0.5, seed=1)
    prefix = "e2e/v1"
    agents = [
        start_agent(
            mosquitto.url,
            digits_bundle.directory,
            write_npz(tmp_path / f"d{i}.npz", data),
            f"agent-{i}",
            prefix,
            tmp_path / f"agent-{i}.log",
        )
        for i, data in enumerate(devices)
    ]
    evaluator = OrtTrainer.open(digits_bundle, threads=2)
    server = FederatedServer(
        server_transport(mosquitto.url, "e2e-server"),
        digits_bundle,
        ServerConfig(
            rounds=5,
            clients_per_round=3,
            min_clients=3,
            wait_for_clients_s=60,
            round_timeout_s=60,
            local_epochs=2,
            lr=0.05,
            topics=Topics(prefix),
        ),
        out_dir=tmp_path / "server",
        evaluator=lambda w: evaluator.evaluate(w, test.x, test.y),
    )
    try:
        server.start()
        results = server.run()
    finally:
        server.close()
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=20)
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(3))
    assert all(r.completed and r.reported == 3 for r in results), (results, logs)
    accuracies = [r.test_accuracy for r in results]
    assert accuracies[-1] > 0.5, accuracies  # chance is 0.1
    assert accuracies[-1] > accuracies[0], accuracies
    assert not server.rejections, list(server.rejections)
    assert len(list((tmp_path / "server" / "models").iterdir())) == 6
    assert all(agent.returncode == 0 for agent in agents), logs  # SIGTERM -> clean shutdown


NO_TORCH_AGENT = """
import sys
from fedflock.cli import main
code = main(sys.argv[1:])
print("TORCH_LOADED=" + str("torch" in sys.modules))
print("ONNXRUNTIME_LOADED=" + str("onnxruntime" in sys.modules))
sys.exit(code)
"""


@pytest.mark.timeout(120)
def test_agent_process_never_imports_torch(mosquitto, digits_bundle, tmp_path) -> None:
    devices, _ = digits_split(2)
    data = write_npz(tmp_path / "d.npz", devices[0])
    prefix = "notorch/v1"
    cmd = [
        sys.executable,
        "-c",
        NO_TORCH_AGENT,
        "agent",
        "--bundle",
        str(digits_bundle.directory),
        "--data",
        str(data),
        "--device-id",
        "lonely",
        "--mqtt-url",
        mosquitto.url,
        "--topic-prefix",
        prefix,
        "--max-tasks",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    server = FederatedServer(
        server_transport(mosquitto.url, "notorch-server"),
        digits_bundle,
        ServerConfig(
            rounds=1,
            clients_per_round=1,
            min_clients=1,
            wait_for_clients_s=60,
            round_timeout_s=60,
            topics=Topics(prefix),
        ),
    )
    try:
        server.start()
        result = server.run_round(1)
    finally:
        server.close()
    out, _ = proc.communicate(timeout=60)
    text = out.decode()
    assert result.completed and result.reported == 1, text
    assert proc.returncode == 0, text
    assert "ONNXRUNTIME_LOADED=True" in text  # it really trained
    assert "TORCH_LOADED=False" in text, text


def test_agent_cli_refuses_a_tampered_bundle(digits_bundle, tmp_path) -> None:
    import shutil

    bundle = shutil.copytree(digits_bundle.directory, tmp_path / "bundle")
    with open(bundle / "weights.fft", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x01\x02\x03\x04")
    devices, _ = digits_split(2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedflock",
            "agent",
            "--bundle",
            str(bundle),
            "--data",
            str(write_npz(tmp_path / "d.npz", devices[0])),
            "--device-id",
            "x",
            "--mqtt-url",
            "mqtt://127.0.0.1:1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "integrity_error" in proc.stderr and "weights.fft" in proc.stderr, proc.stderr
