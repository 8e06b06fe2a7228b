"""The topic layout confines a device under a real Mosquitto running deploy/mosquitto/acl.example.

Devices log in with username == device id. A device can publish its own status and results, read
its own inbox and the public model channels, and nothing else: what it publishes under another
device's id never reaches the server, and it cannot read another device's tasks.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.errors import TransportError
from edge_agent.protocol.topics import Topics
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.mqtt import MqttConfig, MqttTransport

ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.example"
TOPICS = Topics()  # the example ACL is written for the default prefix
USERS = {"fedflock-server": "server-secret", "dev-a": "a-secret", "dev-b": "b-secret"}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory):
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    work = tmp_path_factory.mktemp("acl-broker")
    passwords = work / "passwords"
    for index, (user, secret) in enumerate(USERS.items()):
        flags = ["-b", "-c"] if index == 0 else ["-b"]
        subprocess.run([tool, *flags, str(passwords), user, secret], check=True, capture_output=True)
    passwords.chmod(0o600)
    broker = MosquittoProcess(
        work, allow_anonymous=False, extra_config=(f"password_file {passwords}", f"acl_file {ACL}")
    )
    with broker:
        yield broker


def _client(broker: MosquittoProcess, user: str) -> MqttTransport:
    transport = MqttTransport(
        MqttConfig(host=broker.host, port=broker.port, client_id=user, username=user, password=USERS[user])
    )
    transport.start()
    return transport


def _drain(transport: MqttTransport, seconds: float) -> list[InboundMessage]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = transport.receive(timeout=0.1)
        if message is not None:
            got.append(message)
    return got


def _try_publish(transport: MqttTransport, topic: str, payload: bytes) -> None:
    try:  # MQTT 5 reports "Not authorized" in the PUBACK; MQTT 3.1.1 brokers drop silently
        transport.publish(topic, payload, qos=1)
    except TransportError as exc:
        assert "authori" in str(exc).lower(), exc


def test_a_device_publishes_only_under_its_own_id(acl_broker: MosquittoProcess) -> None:
    server, a = _client(acl_broker, "fedflock-server"), _client(acl_broker, "dev-a")
    try:
        server.subscribe(TOPICS.all_devices("results"))
        server.subscribe(TOPICS.all_devices("status"))
        a.publish(TOPICS.results("dev-a"), b"mine", qos=1)
        _try_publish(a, TOPICS.results("dev-b"), b"forged")
        _try_publish(a, TOPICS.status("dev-b"), b"forged")
        _try_publish(a, TOPICS.tasks("dev-b"), b"forged")
        got = _drain(server, 1.5)
        assert [(m.topic, m.payload) for m in got] == [(TOPICS.results("dev-a"), b"mine")]
    finally:
        server.close()
        a.close()


def test_a_device_reads_only_its_inbox_and_the_model_channels(acl_broker: MosquittoProcess) -> None:
    server, a, b = (_client(acl_broker, u) for u in ("fedflock-server", "dev-a", "dev-b"))
    try:
        a.subscribe(TOPICS.tasks("dev-a"))
        a.subscribe(f"{TOPICS.prefix}/models/#")
        for topic in (TOPICS.tasks("dev-a"), TOPICS.results("dev-a")):
            try:  # MQTT 5 / Mosquitto 2: SUBACK "Not authorized"; otherwise nothing is ever delivered
                b.subscribe(topic)
            except TransportError as exc:
                assert "authori" in str(exc).lower() or "refused" in str(exc).lower(), exc
        server.publish(TOPICS.tasks("dev-a"), b"task for a", qos=1)
        server.publish(TOPICS.model_channel("current"), b"v7", qos=1, retain=True)
        a.publish(TOPICS.results("dev-a"), b"a's result", qos=1)
        got_a = sorted((m.topic, m.payload) for m in _drain(a, 1.5))
        assert got_a == sorted([(TOPICS.tasks("dev-a"), b"task for a"), (TOPICS.model_channel("current"), b"v7")])
        assert _drain(b, 0.5) == []
    finally:
        server.publish(TOPICS.model_channel("current"), b"", qos=1, retain=True)
        for client in (server, a, b):
            client.close()
