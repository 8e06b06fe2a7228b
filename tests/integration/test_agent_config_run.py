"""`fedflock agent --config agent.toml` as a separate process, two FedAvg rounds over a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from broker_server.server import FederatedServer, ServerConfig
from edge_agent.device.state import NETWORK_KINDS
from edge_agent.protocol.messages import StatusMessage, decode_message
from edge_agent.protocol.topics import Topics
from edge_agent.store import DeviceStore, StoreConfig
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url
from tests.fixtures import digits_split, write_npz

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

#: Every check passes on any Linux machine (a CI runner may have no default route or sensors).
POLICY = """
[policy]
min_free_memory_mb = 0
min_free_disk_mb = 0
max_temperature_c = 150
unmetered_for = []
require_network_for = []

[policy.unknown]
charging = "allow"
memory = "allow"
"""


def transport(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


def delivered(db: Path, timeout_s: float) -> tuple[int, int]:
    """(pending, delivered) results once nothing is pending (the PUBACK may trail the server's round end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with DeviceStore.open(db, config=StoreConfig(check_on_open=False)) as store:
            sizes = store.sizes()
        if sizes.pending_results == 0 or time.monotonic() > deadline:
            return sizes.pending_results, sizes.delivered_results
        time.sleep(0.1)


def retained_status(url: str, topic: str, client_id: str) -> StatusMessage:
    listener = transport(url, client_id)
    listener.start()
    try:
        listener.subscribe(topic, qos=1)
        inbound = listener.receive(timeout=10)
    finally:
        listener.close()
    assert inbound is not None, f"no retained message on {topic}"
    message = decode_message(inbound.payload)
    assert isinstance(message, StatusMessage)
    return message


@pytest.mark.timeout(120)
def test_agent_from_its_config_file_trains_two_rounds_and_stops_on_sigterm(mosquitto, digits_bundle, tmp_path) -> None:
    run = uuid.uuid4().hex[:8]
    device_id, prefix = f"cfg-{run}", f"cfgrun-{run}/v1"
    devices, _ = digits_split(2)
    write_npz(tmp_path / "d0.npz", devices[0])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "state"\nbundle = "{digits_bundle.directory}"\n\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\ntopic_prefix = "{prefix}"\n\n'
        f'[data]\nkind = "npz"\npath = "d0.npz"\n\n[agent]\nmonitor_interval_s = 1\n{POLICY}',
        encoding="utf-8",
    )
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "fedflock", "agent", "--config", str(config)],
            cwd=tmp_path,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        server = FederatedServer(
            transport(mosquitto.url, f"cfg-server-{run}"),
            digits_bundle,
            ServerConfig(
                rounds=2,
                clients_per_round=1,
                min_clients=1,
                wait_for_clients_s=60,
                round_timeout_s=60,
                topics=Topics(prefix),
            ),
        )
        initial = digits_bundle.initial_weights()
        server.start()
        try:
            results = server.run()
        finally:
            server.close()
        text = log.read_text()
        assert [(r.completed, r.reported) for r in results] == [(True, 1), (True, 1)], text
        assert server.model_version == 2
        assert any(not np.allclose(server.weights[name], initial[name]) for name in initial), "model unchanged"

        state = tmp_path / "state"
        pointer = json.loads((state / "models" / "current.json").read_text())
        assert pointer["current"]["version"] == 0
        assert pointer["current"]["digest"] == digits_bundle.digest
        assert (state / "agent.db").is_file()
        assert delivered(state / "agent.db", timeout_s=10) == (0, 2), log.read_text()
        status = subprocess.run(
            [sys.executable, "-m", "fedflock", "agent", "status", "--config", str(config)],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "0 results to upload, 2 delivered kept" in status.stdout, status.stdout
        assert f"model: v0 {digits_bundle.digest[:12]}" in status.stdout, status.stdout

        message = retained_status(mosquitto.url, Topics(prefix).status(device_id), f"cfg-listener-{run}")
        assert message.online and message.device_id == device_id
        assert message.eligibility == {"phase": "train", "eligible": True, "reasons": []}, message.eligibility
        assert message.device_state["network"]["kind"] in NETWORK_KINDS, message.device_state
        assert message.device_state["memory_available_bytes"] > 0
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
            raise
    text = log.read_text()
    assert code == 0, text
    assert f"installed {digits_bundle.directory} as model version 0" in text, text
    assert text.count("delivered result of task") == 2, text
    assert "Traceback" not in text, text
