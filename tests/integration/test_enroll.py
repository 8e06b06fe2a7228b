"""Enrollment end to end: ``pki token`` -> ``agent enroll`` over HTTPS -> mutual TLS to a real Mosquitto.

The enrollment server runs in this process on a free port with the PKI's server certificate; the
broker runs the generated mutual-TLS config (``test_acl_certificates.generated_mtls_broker``).
"""

from __future__ import annotations

import datetime
import json
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_server.pki.enroll_server import EnrollmentConfig, EnrollmentServer
from broker_server.pki.passwords import PasswordFile, verify_password
from broker_server.pki.store import PkiStore, utc_now
from edge_agent.enroll import EnrollRequest, enroll
from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig
from fedflock.cli import main
from tests.integration.test_acl_certificates import TOPICS, Broker, generated_mtls_broker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from generated_mtls_broker(tmp_path_factory.mktemp("enroll"))


def _server(broker: Broker, **fields: object) -> EnrollmentServer:
    store = PkiStore(broker.pki, clock=fields.pop("clock", utc_now))  # type: ignore[arg-type]
    config = EnrollmentConfig(
        host="127.0.0.1",
        port=0,
        certfile=store.server_cert,
        keyfile=store.server_key,
        **fields,  # type: ignore[arg-type]
    )
    return EnrollmentServer(store, config)


def _token(broker: Broker, device_id: str, capsys: pytest.CaptureFixture[str], ttl: str = "1h") -> str:
    assert main(["pki", "token", device_id, "--dir", str(broker.pki), "--ttl", ttl]) == 0
    return capsys.readouterr().out.strip()


def test_a_token_becomes_a_certificate_that_connects_and_is_confined(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(broker, "dev-new", capsys)
    out = tmp_path / "credentials"
    with _server(broker, mqtt_url=f"mqtts://127.0.0.1:{broker.process.port}") as server:
        argv = ["agent", "enroll", "--url", server.url, "--token", token, "--ca-file", str(broker.pki / "ca.crt")]
        assert main([*argv, "--out", str(out), "--device-id", "dev-new"]) == 0
        # the token is single use: a replay is refused and writes nothing new
        again = EnrollRequest(url=server.url, token=token, ca_file=broker.pki / "ca.crt", out_dir=tmp_path / "again")
        with pytest.raises(ConfigError, match=r"refused \(403\): token refused"):
            enroll(again)
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    assert token not in (broker.pki / "tokens.json").read_text()  # only its hash is stored
    snippet = (out / "mqtt.toml").read_text()
    assert f'cert_file = "{(out / "device.crt").resolve()}"' in snippet and "mqtts://127.0.0.1" in snippet

    tls = TlsConfig(ca_file=out / "ca.crt", cert_file=out / "device.crt", key_file=out / "device.key")
    device = MqttTransport(MqttConfig.from_url(f"mqtts://127.0.0.1:{broker.process.port}", tls=tls, client_id="x"))
    server_side = broker.device("fedflock-server")
    try:
        device.start()
        server_side.subscribe(TOPICS.all_devices("results"), qos=1)
        device.publish(TOPICS.results("dev-new"), b"enrolled", qos=1)
        with pytest.raises(TransportError, match="Not authorized"):
            device.publish(TOPICS.results("dev-a"), b"forged", qos=1)
        got = server_side.receive(timeout=5.0)
        assert got is not None and (got.topic, got.payload) == (TOPICS.results("dev-new"), b"enrolled")
        assert server_side.receive(timeout=0.5) is None
    finally:
        device.close()
        server_side.close()


def test_an_expired_token_is_refused_and_a_bad_csr_does_not_burn_a_token(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expired, kept = _token(broker, "dev-late", capsys, ttl="60s"), _token(broker, "dev-kept", capsys)
    later = utc_now() + datetime.timedelta(minutes=2)
    with _server(broker, clock=lambda: later) as server:
        request = EnrollRequest(url=server.url, token=expired, ca_file=broker.pki / "ca.crt", out_dir=tmp_path / "x")
        with pytest.raises(ConfigError, match="token refused"):
            enroll(request)
        context = ssl.create_default_context(cafile=str(broker.pki / "ca.crt"))
        body = json.dumps({"token": kept, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nnope\n"}).encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(server.url, data=body, method="POST"), context=context)
        assert caught.value.code == 400
        ok = EnrollRequest(url=server.url, token=kept, ca_file=broker.pki / "ca.crt", out_dir=tmp_path / "kept")
        assert enroll(ok).device_id == "dev-kept"


def test_an_endpoint_with_a_certificate_from_another_ca_is_not_trusted(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = PkiStore(tmp_path / "other")
    other.init("another CA", 30)
    token = _token(broker, "dev-x", capsys)
    with _server(broker) as server:
        request = EnrollRequest(url=server.url, token=token, ca_file=other.ca_cert, out_dir=tmp_path / "x")
        with pytest.raises(TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            enroll(request)
    assert not (tmp_path / "x" / "device.crt").exists()


def test_password_enrollment_writes_a_mosquitto_entry_and_returns_the_password_once(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token, passwords = _token(broker, "dev-pw", capsys), tmp_path / "passwords"
    with _server(broker, password_file=passwords) as server:
        out = tmp_path / "pw"
        request = EnrollRequest(
            url=server.url, token=token, ca_file=broker.pki / "ca.crt", out_dir=out, credential="password"
        )
        assert enroll(request).device_id == "dev-pw"
    password = (out / "password").read_text().strip()
    assert stat.S_IMODE((out / "password").stat().st_mode) == 0o600
    assert verify_password(password, PasswordFile(passwords).entries()["dev-pw"])
    assert password not in passwords.read_text()
