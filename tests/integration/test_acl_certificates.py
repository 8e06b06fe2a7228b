"""Mutual TLS with the generated config (``pki mosquitto-config --auth certificate``) on a real Mosquitto.

The certificate's CN is the username the ACL's ``%u`` sees. Refused: no certificate (anonymous),
a certificate from another CA, an expired one (issued with the PKI's clock set in the past), and a
revoked one (``pki revoke`` rewrites the CRL; Mosquitto re-reads it on SIGHUP).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_server.mosquitto_process import free_port
from broker_server.pki.mosquitto_run import ConfiguredMosquitto
from broker_server.pki.store import PkiStore, utc_now
from edge_agent.errors import TransportError
from edge_agent.protocol.topics import Topics
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig
from fedflock.cli import main

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics("mtls/v1")


@dataclass(frozen=True)
class Broker:
    process: ConfiguredMosquitto
    pki: Path
    conf_dir: Path

    def client(self, cert: Path | None, key: Path | None, ca: Path | None = None) -> MqttTransport:
        tls = TlsConfig(ca_file=ca or self.pki / "ca.crt", cert_file=cert, key_file=key)
        config = MqttConfig.from_url(
            f"mqtts://127.0.0.1:{self.process.port}", tls=tls, client_id="ignored", protocol="5", connect_timeout=10.0
        )
        transport = MqttTransport(config)
        transport.start()
        return transport

    def device(self, name: str) -> MqttTransport:
        folder = self.pki / "clients" / name
        return self.client(folder / f"{name}.crt", folder / f"{name}.key")


def generated_mtls_broker(work: Path) -> Iterator[Broker]:
    """A Mosquitto running exactly what ``fedflock pki`` generates for mutual TLS (also used by test_enroll)."""
    pki, conf_dir, port = work / "pki", work / "conf", free_port()
    for argv in (
        ["init"],
        ["server-cert", "--host", "127.0.0.1"],
        ["service-cert"],
        ["device-cert", "dev-a"],
        ["device-cert", "dev-b"],
        ["acl", "--out", str(conf_dir / "acl"), "--prefix", TOPICS.prefix],
        [
            "mosquitto-config", "--out", str(conf_dir / "mosquitto.conf"), "--auth", "certificate",
            "--acl-file", str(conf_dir / "acl"), "--persistence-location", str(work / "data"),
            "--port", str(port), "--bind", "127.0.0.1", "--run-as-user", "root",
            "--log-dest", f"file {work / 'mosquitto.log'}",
        ],
    ):  # fmt: skip
        assert main(["pki", *argv[:1], "--dir", str(pki), *argv[1:]]) == 0
    (work / "data").mkdir()
    with ConfiguredMosquitto(conf_dir / "mosquitto.conf", host="127.0.0.1", port=port) as process:
        yield Broker(process=process, pki=pki, conf_dir=conf_dir)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from generated_mtls_broker(tmp_path_factory.mktemp("mtls"))


def test_the_certificate_name_is_the_acl_identity(broker: Broker) -> None:
    server, a = broker.device("fedflock-server"), broker.device("dev-a")
    try:
        server.subscribe(f"{TOPICS.prefix}/#", qos=1)
        a.publish(TOPICS.results("dev-a"), b"mine", qos=1)
        with pytest.raises(TransportError, match="Not authorized"):
            a.publish(TOPICS.results("dev-b"), b"forged", qos=1)
        first = server.receive(timeout=5.0)
        assert first is not None and (first.topic, first.payload) == (TOPICS.results("dev-a"), b"mine")
        assert server.receive(timeout=0.5) is None
    finally:
        server.close()
        a.close()


def test_a_client_without_a_certificate_is_refused(broker: Broker) -> None:
    with pytest.raises(TransportError, match="certificate required"):
        broker.client(None, None)


def test_a_certificate_from_another_ca_is_refused(broker: Broker, tmp_path: Path) -> None:
    other = PkiStore(tmp_path / "other")
    other.init("another CA", 30)
    files = other.issue_client("dev-a", 30, kind="device")  # the same name, the wrong issuer
    with pytest.raises(TransportError, match="unknown ca"):
        broker.client(files.cert, files.key)


def test_an_expired_certificate_is_refused(broker: Broker) -> None:
    past = utc_now() - datetime.timedelta(days=10)
    files = PkiStore(broker.pki, clock=lambda: past).issue_client("dev-old", 2, kind="device")
    with pytest.raises(TransportError, match="certificate expired"):
        broker.client(files.cert, files.key)


def test_a_revoked_certificate_is_refused_after_a_reload(broker: Broker) -> None:
    a = broker.device("dev-b")
    a.close()
    assert main(["pki", "revoke", "dev-b", "--dir", str(broker.pki), "--reload-pid", str(broker.process.pid)]) == 0
    broker.process.reload()
    with pytest.raises(TransportError, match="certificate revoked"):
        broker.device("dev-b")
    broker.device("dev-a").close()  # the others are unaffected
