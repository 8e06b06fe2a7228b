"""deploy/mosquitto/mosquitto.conf and acl.example are what ``fedflock pki`` generates, and they run.

The checked-in files must equal the generator's output for the paths they name (so they cannot
drift), and a real Mosquitto must start with the example config (paths pointed at a test PKI) and
accept a device certificate from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_server.mosquitto_process import free_port
from broker_server.pki.mosquitto_run import ConfiguredMosquitto
from broker_server.pki.store import PkiStore
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig
from fedflock.cli import main

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
GENERATE = [
    "pki", "mosquitto-config", "--dir", "/etc/fedflock/pki", "--auth", "certificate",
    "--acl-file", "/etc/mosquitto/fedflock.acl", "--persistence-location", "/var/lib/mosquitto",
    "--run-as-user", "mosquitto",
]  # fmt: skip


def test_the_checked_in_files_are_the_generated_ones(tmp_path: Path) -> None:
    assert main([*GENERATE, "--out", str(tmp_path / "mosquitto.conf")]) == 0
    assert (tmp_path / "mosquitto.conf").read_text() == (DEPLOY / "mosquitto.conf").read_text()
    assert main(["pki", "acl", "--dir", str(tmp_path / "no-pki"), "--out", str(tmp_path / "acl")]) == 0
    assert (tmp_path / "acl").read_text() == (DEPLOY / "acl.example").read_text()


def test_mosquitto_runs_the_example_config(tmp_path: Path) -> None:
    store = PkiStore(tmp_path / "pki")
    store.init("CA", 30)
    store.issue_server(["127.0.0.1"], 30)
    device = store.issue_client("dev-a", 30, kind="device")
    port = free_port()
    (tmp_path / "data").mkdir()
    text = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in {
        "/etc/fedflock/pki": str(store.root),
        "/etc/mosquitto/fedflock.acl": str(DEPLOY / "acl.example"),
        "/var/lib/mosquitto/": f"{tmp_path / 'data'}/",
        "user mosquitto": "user root",
        "listener 8883 0.0.0.0": f"listener {port} 127.0.0.1",
    }.items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "mosquitto.conf").write_text(text)
    with ConfiguredMosquitto(tmp_path / "mosquitto.conf", host="127.0.0.1", port=port):
        tls = TlsConfig(ca_file=store.ca_cert, cert_file=device.cert, key_file=device.key)
        transport = MqttTransport(MqttConfig.from_url(f"mqtts://127.0.0.1:{port}", tls=tls, client_id="dev-a"))
        transport.start()
        try:
            transport.publish("fedflock/v1/devices/dev-a/results", b"ok", qos=1)
        finally:
            transport.close()
