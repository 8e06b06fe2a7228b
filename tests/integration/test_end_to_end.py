"""Export -> 3 agent processes -> FedAvg server, over a real Mosquitto process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.protocol.topics import Topics
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


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "fedflock", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_export_broker_and_three_agents_through_the_cli_over_real_mosquitto(mosquitto, tmp_path) -> None:
    """The user's path: `fedflock export`, `fedflock broker`, 3 x `fedflock agent`, all separate processes."""
    bundle = tmp_path / "bundle"
    exported = run_cli(
        "export",
        "model_export.models:digits_cnn",
        "--input-shape",
        "1,8,8",
        "--num-classes",
        "10",
        "--loss",
        "cross_entropy",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--out",
        str(bundle),
    )
    assert exported.returncode == 0, exported.stderr
    devices, test = digits_split(3, alpha=0.5, seed=1)
    prefix = "e2e/v1"
    agents = [
        start_agent(
            mosquitto.url,
            bundle,
            write_npz(tmp_path / f"d{i}.npz", data),
            f"agent-{i}",
            prefix,
            tmp_path / f"agent-{i}.log",
        )
        for i, data in enumerate(devices)
    ]
    try:
        server = run_cli(
            "broker",
            "--bundle",
            str(bundle),
            "--mqtt-url",
            mosquitto.url,
            "--topic-prefix",
            prefix,
            "--rounds",
            "5",
            "--clients-per-round",
            "3",
            "--min-clients",
            "3",
            "--round-timeout",
            "60",
            "--wait-for-clients",
            "60",
            "--local-epochs",
            "2",
            "--test-data",
            str(write_npz(tmp_path / "test.npz", test)),
            "--out",
            str(tmp_path / "server"),
        )
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=20)
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(3))
    assert server.returncode == 0, server.stderr + logs
    results = [json.loads(line) for line in (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in results] == [1, 2, 3, 4, 5]
    assert all(r["completed"] and r["reported"] == 3 for r in results), results
    accuracies = [r["test_accuracy"] for r in results]
    assert accuracies[-1] > 0.5, accuracies  # chance is 0.1
    assert accuracies[-1] > accuracies[0], accuracies
    assert "rejected" not in server.stderr, server.stderr
    assert len(list((tmp_path / "server" / "models").iterdir())) == 6
    assert (tmp_path / "server" / "accuracy.png").stat().st_size > 1000
    assert all(agent.returncode == 0 for agent in agents), logs  # SIGTERM -> clean shutdown
    assert logs.count("trained") == 15, logs


def test_broker_refuses_to_overwrite_an_earlier_federation(digits_bundle, tmp_path) -> None:
    (tmp_path / "models" / "v000000").mkdir(parents=True)
    result = run_cli(
        "broker",
        "--bundle",
        str(digits_bundle.directory),
        "--out",
        str(tmp_path),
        "--mqtt-url",
        "mqtt://127.0.0.1:1",
        timeout=60,
    )
    assert result.returncode == 2 and "already holds model versions" in result.stderr, result.stderr


def server_transport(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


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
    data = write_npz(tmp_path / "d.npz", devices[0])
    proc = run_cli(
        "agent",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--device-id",
        "x",
        "--mqtt-url",
        "mqtt://127.0.0.1:1",
        timeout=60,
    )
    assert proc.returncode == 2
    assert "integrity_error" in proc.stderr and "weights.fft" in proc.stderr, proc.stderr


def test_agent_cli_refuses_data_that_does_not_fit_the_model(digits_bundle, tmp_path) -> None:
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((10, 3, 8, 8), np.float32), y=np.zeros(10, np.int64))
    result = run_cli(
        "agent",
        "--bundle",
        str(digits_bundle.directory),
        "--data",
        str(data),
        "--device-id",
        "w",
        "--mqtt-url",
        "mqtt://127.0.0.1:1",
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "training_error" in result.stderr and "[10, 3, 8, 8]" in result.stderr and "[N, 1, 8, 8]" in result.stderr
