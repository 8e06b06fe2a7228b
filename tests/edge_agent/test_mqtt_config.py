"""The paho-free parts of the MQTT transport: broker URLs, TLS and credential settings, ack bookkeeping.

Nothing here opens a connection; TLS against a real broker is in tests/integration/test_mqtt_tls.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport.mqtt import MqttConfig, TlsConfig, parse_broker_url, parse_mqtt_url
from edge_agent.transport.mqtt_config import Acks, BrokerAddress
from edge_agent.transport.tls import read_password_file


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example", BrokerAddress("broker.example", 1883, tls=False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, tls=True)),
        ("mqtts://broker.example:1884/", BrokerAddress("broker.example", 1884, tls=True)),
        (" mqtts://[::1]:8884 ", BrokerAddress("::1", 8884, tls=True)),
    ],
)
def test_parse_broker_url_accepts_mqtt_and_mqtts(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["tcp://broker", "ssl://broker:8883", "mqtts://", "mqtts://user:pw@broker", "mqtts://broker/x", "mqtts://broker:0"],
)
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_broker_url(url)


def test_parse_mqtt_url_refuses_mqtts_rather_than_dropping_tls() -> None:
    assert parse_mqtt_url("mqtt://broker.example") == ("broker.example", 1883)
    with pytest.raises(ConfigError, match="parse_broker_url"):
        parse_mqtt_url("mqtts://broker.example")


def test_broker_address_url_brackets_ipv6_hosts() -> None:
    assert BrokerAddress("::1", 8883, tls=True).url == "mqtts://[::1]:8883"
    assert BrokerAddress("broker", 1883, tls=False).url == "mqtt://broker:1883"


def test_from_url_decides_tls_from_the_scheme() -> None:
    plain = MqttConfig.from_url("mqtt://broker", client_id="d1")
    assert (plain.host, plain.port, plain.tls, plain.url) == ("broker", 1883, None, "mqtt://broker:1883")
    system_store = MqttConfig.from_url("mqtts://broker", client_id="d1")
    assert system_store.tls == TlsConfig(ca_file=None, cert_file=None, key_file=None)
    assert system_store.url == "mqtts://broker:8883"
    own_ca = TlsConfig(ca_file=Path("/etc/fedflock/ca.pem"))
    assert MqttConfig.from_url("mqtts://broker:9999", client_id="d1", tls=own_ca).tls is own_ca


def test_from_url_refuses_a_tls_config_for_a_plain_url() -> None:
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttConfig.from_url("mqtt://broker", client_id="d1", tls=TlsConfig())


def test_tls_config_reads_no_files_when_constructed(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    tls = TlsConfig(ca_file=missing / "ca.pem", cert_file=missing / "c.pem", key_file=missing / "k.pem")
    config = MqttConfig(host="broker", client_id="d1", username="u", password_file=missing / "pw", tls=tls)
    assert config.tls is tls and not missing.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"cert_file": Path("c.pem")},
        {"key_file": Path("k.pem")},
        {"ca_file": "ca.pem"},
    ],
)
def test_tls_config_rejects(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TlsConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"password_file": Path("pw")},  # needs a username
        {"username": "u", "password": "x", "password_file": Path("pw")},
        {"username": "u", "password_file": "pw"},
        {"tls": "yes"},
    ],
)
def test_mqtt_config_rejects_bad_credentials_and_tls(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        MqttConfig(host="broker", client_id="d1", **fields)  # type: ignore[arg-type]


def test_password_file_is_read_without_its_trailing_newline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret with spaces \r\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert read_password_file(path) == "s3cret with spaces "
    assert caplog.records == []


def test_world_readable_password_file_is_used_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edge_agent.transport.tls"):
        assert read_password_file(path) == "s3cret"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(path) in caplog.records[0].getMessage()


@pytest.mark.parametrize(("content", "expected"), [(None, "cannot read"), ("\n", "is empty"), (b"\xff\xfe", "UTF-8")])
def test_unusable_password_file_is_a_config_error_naming_it(
    content: str | bytes | None, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "pw"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as caught:
        read_password_file(path)
    assert str(path) in str(caught.value)


def test_acks_hand_a_suback_to_its_waiter() -> None:
    acks = Acks()
    threading.Timer(0.05, acks.suback, args=(7, [])).start()
    acks.await_suback(7, timeout=5.0)
    acks.suback(8, ["Not authorized (0x87)"])
    with pytest.raises(TransportError, match=r"refused subscription: Not authorized \(0x87\)"):
        acks.await_suback(8, timeout=1.0)
    with pytest.raises(TransportError, match="no SUBACK"):
        acks.await_suback(9, timeout=0.01)


def test_acks_forget_subacks_of_a_previous_connection() -> None:
    acks = Acks()
    acks.suback(3, [])
    acks.forget_subacks()
    with pytest.raises(TransportError, match="no SUBACK"):
        acks.await_suback(3, timeout=0.01)


def test_acks_publish_failure_is_read_once_and_cleared_by_a_later_success() -> None:
    acks = Acks()
    acks.puback(1, "Quota exceeded (0x97)")
    assert acks.publish_failure(1) == "Quota exceeded (0x97)"
    assert acks.publish_failure(1) is None
    acks.puback(2, "Not authorized (0x87)")
    acks.puback(2, None)  # the mid was reused and this time it succeeded
    assert acks.publish_failure(2) is None
