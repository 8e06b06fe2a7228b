"""MQTT 5 features of ``MqttTransport`` against real Mosquitto brokers (and amqtt where it refuses MQTT 5).

Covered: message expiry, session expiry, the broker's Maximum Packet Size, and failure reason
codes (CONNACK is covered in test_transport_contract.py) — each next to what MQTT 3.1.1 does in
the same situation, because the transport silently degrades to 3.1.1 on brokers without MQTT 5.

Brokers with a special configuration (ACL, dynamic-security plugin, ``max_packet_size``) are
started per module; the plain one is the session's ``mosquitto`` fixture. The only fixed sleeps
are the expiry waits: Mosquitto counts expiry in whole seconds, so a 1 s expiry is guaranteed to
be over only 2 s after the publish.
"""

from __future__ import annotations

import glob
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_server.embedded_broker import EmbeddedBroker
from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.errors import TransportError
from edge_agent.transport.base import InboundMessage, Will
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from edge_agent.transport.mqtt_config import (
    MAX_FOUR_BYTE_INTEGER,
    message_expiry_interval,
    publish_packet_size,
    session_expiry_interval,
)

pytestmark = pytest.mark.timeout(60)

EXPIRY_WAIT_S = 2.5  # > 2 s: a 1 s expiry in whole seconds is over by then, wherever the second boundary fell
QUIET_S = 1.0  # how long "nothing arrives" is watched for
MAX_PACKET = 2048
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


class ConfiguredMosquitto(MosquittoProcess):
    """:class:`MosquittoProcess` with extra ``mosquitto.conf`` lines appended to its own config."""

    def __init__(self, workdir: Path, extra_lines: list[str]) -> None:
        super().__init__(workdir)
        self._extra_lines = extra_lines

    def _config_text(self) -> str:
        return super()._config_text() + "\n".join(self._extra_lines) + "\n"


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """Anonymous clients may use ``open/#`` only (ACL file); packets are capped at MAX_PACKET bytes.

    Mosquitto 2.0's ACL file never refuses a SUBSCRIBE (it filters deliveries instead), so
    subscription refusals need the dynamic-security plugin (:func:`dynsec`).
    """
    workdir = tmp_path_factory.mktemp("mosquitto-restricted")
    acl = workdir / "acl"
    acl.write_text("topic readwrite open/#\n")
    with ConfiguredMosquitto(workdir, [f"acl_file {acl}", f"max_packet_size {MAX_PACKET}"]) as broker:
        yield broker


@pytest.fixture(scope="module")
def dynsec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """Mosquitto's dynamic-security plugin: anonymous clients may publish and subscribe under ``open/#`` only."""
    plugins = [path for pattern in DYNSEC_PLUGIN_GLOBS for path in glob.glob(pattern)]
    if not plugins:
        pytest.skip("mosquitto_dynamic_security.so (part of Debian's mosquitto package) not found")
    workdir = tmp_path_factory.mktemp("mosquitto-dynsec")
    config = workdir / "dynamic-security.json"
    config.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": False,
                    "publishClientReceive": True,
                    "subscribe": False,
                    "unsubscribe": True,
                },
                "clients": [],
                "groups": [{"groupname": "anonymous", "roles": [{"rolename": "open"}], "clients": []}],
                "anonymousGroup": "anonymous",
                "roles": [
                    {
                        "rolename": "open",
                        "acls": [
                            {"acltype": "subscribePattern", "topic": "open/#", "allow": True},
                            {"acltype": "publishClientSend", "topic": "open/#", "allow": True},
                        ],
                    }
                ],
            }
        )
    )
    lines = [f"plugin {plugins[0]}", f"plugin_opt_config_file {config}"]
    with ConfiguredMosquitto(workdir, lines) as broker:
        yield broker


@pytest.fixture
def opened() -> Iterator[list[MqttTransport]]:
    """Transports to close at the end of the test, whatever happened."""
    transports: list[MqttTransport] = []
    yield transports
    for transport in transports:
        transport.close()


def connect(
    broker: MosquittoProcess | EmbeddedBroker,
    opened: list[MqttTransport],
    client_id: str,
    *,
    protocol: str = "5",
    start: bool = True,
    **fields: object,
) -> MqttTransport:
    config = MqttConfig(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        protocol=protocol,
        connect_timeout=10.0,
        publish_timeout=10.0,
        **fields,  # type: ignore[arg-type]
    )
    transport = MqttTransport(config)
    opened.append(transport)
    if start:
        transport.start()
        assert transport.protocol_in_use == protocol
    return transport


def drain(transport: MqttTransport, quiet: float = QUIET_S) -> list[InboundMessage]:
    """Everything that arrives until nothing has arrived for ``quiet`` seconds."""
    received: list[InboundMessage] = []
    while (message := transport.receive(timeout=quiet)) is not None:
        received.append(message)
    return received


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- message expiry ---------------------------------------------------------------------------


@pytest.mark.integration
def test_message_expiry_drops_messages_queued_for_an_offline_subscriber(
    mosquitto: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    prefix = f"v5/{uuid.uuid4().hex[:12]}"
    device_id = unique("expiry-device")
    device = connect(mosquitto, opened, device_id, clean_session=False)
    device.subscribe(f"{prefix}/#", qos=1)
    device.close()

    sender = connect(mosquitto, opened, unique("expiry-sender"))
    sender.publish(f"{prefix}/short", b"expires after 1 s", qos=1, expiry_s=1)
    sender.publish(f"{prefix}/fraction", b"0.2 s rounds up to 1 s", qos=1, expiry_s=0.2)
    sender.publish(f"{prefix}/durable", b"never expires", qos=1)
    sender.publish(f"{prefix}/hour", b"expires in an hour", qos=1, expiry_s=3600)
    published = time.monotonic()
    old_sender = connect(mosquitto, opened, unique("expiry-sender-311"), protocol="3.1.1")
    old_sender.publish(f"{prefix}/v311", b"3.1.1 cannot say expiry: ignored", qos=1, expiry_s=1)

    time.sleep(max(0.0, published + EXPIRY_WAIT_S - time.monotonic()))
    device = connect(mosquitto, opened, device_id, clean_session=False)  # the broker kept the subscription
    assert sorted(m.topic for m in drain(device)) == [f"{prefix}/durable", f"{prefix}/hour", f"{prefix}/v311"]
    device.close()
    connect(mosquitto, opened, device_id).close()  # clean start: drop the session from the shared broker


# -- session expiry ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("session_expiry_s", [None, 60])
def test_session_keeps_subscriptions_and_queued_messages_while_offline(
    session_expiry_s: int | None, mosquitto: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    prefix = f"v5/{uuid.uuid4().hex[:12]}"
    device_id = unique("session-device")
    fields: dict[str, object] = {"clean_session": False, "session_expiry_s": session_expiry_s}
    device = connect(mosquitto, opened, device_id, **fields)
    device.subscribe(f"{prefix}/cmd", qos=1)
    device.close()

    sender = connect(mosquitto, opened, unique("session-sender"))
    for number in range(3):
        sender.publish(f"{prefix}/cmd", f"queued {number}".encode(), qos=1)

    device = connect(mosquitto, opened, device_id, **fields)  # no subscribe(): the broker kept it
    assert drain(device) == [InboundMessage(f"{prefix}/cmd", f"queued {n}".encode()) for n in range(3)]
    sender.publish(f"{prefix}/cmd", b"live", qos=1)
    assert device.receive(timeout=10) == InboundMessage(f"{prefix}/cmd", b"live")
    device.close()
    connect(mosquitto, opened, device_id).close()


@pytest.mark.integration
def test_session_expires_after_session_expiry_s(mosquitto: MosquittoProcess, opened: list[MqttTransport]) -> None:
    prefix = f"v5/{uuid.uuid4().hex[:12]}"
    device_id = unique("short-session")
    device = connect(mosquitto, opened, device_id, clean_session=False, session_expiry_s=1)
    device.subscribe(f"{prefix}/cmd", qos=1)
    device.close()
    closed = time.monotonic()
    sender = connect(mosquitto, opened, unique("short-session-sender"))
    sender.publish(f"{prefix}/cmd", b"queued, then dropped with the session", qos=1)

    time.sleep(max(0.0, closed + EXPIRY_WAIT_S - time.monotonic()))
    device = connect(mosquitto, opened, device_id, clean_session=False, session_expiry_s=1)
    sender.publish(f"{prefix}/cmd", b"nobody subscribes any more", qos=1)
    assert drain(device) == [], "session, subscription and queued message are gone"


# -- Maximum Packet Size ----------------------------------------------------------------------


@pytest.mark.integration
def test_publish_larger_than_the_maximum_packet_size_is_refused_before_sending(
    restricted: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    subscriber = connect(restricted, opened, unique("big-sub"))
    publisher = connect(restricted, opened, unique("big-pub"))
    assert publisher.max_packet_size == MAX_PACKET
    topic = "open/big"
    subscriber.subscribe(topic)

    # The largest payload that fits exactly: the broker accepting it proves the size arithmetic.
    largest = MAX_PACKET
    while publish_packet_size(topic, largest, qos=1, properties_size=1) > MAX_PACKET:
        largest -= 1
    assert publish_packet_size(topic, largest, qos=1, properties_size=1) == MAX_PACKET
    publisher.publish(topic, b"x" * largest, qos=1)
    assert subscriber.receive(timeout=10) == InboundMessage(topic, b"x" * largest)

    for payload_size, expiry_s in ((largest + 1, None), (largest, 60.0), (10 * MAX_PACKET, None)):
        with pytest.raises(TransportError, match=f"over the broker's Maximum Packet Size of {MAX_PACKET} bytes"):
            publisher.publish(topic, b"x" * payload_size, qos=1, expiry_s=expiry_s)  # properties count too
    publisher.publish(topic, b"y" * (largest + 2), qos=0)  # QoS 0 has no packet id: 2 bytes more fit
    assert subscriber.receive(timeout=10) == InboundMessage(topic, b"y" * (largest + 2))
    with pytest.raises(TransportError, match="Maximum Packet Size"):
        publisher.publish(topic, b"y" * (largest + 3), qos=0)

    publisher.publish(topic, b"still connected", qos=1)
    assert subscriber.receive(timeout=10) == InboundMessage(topic, b"still connected")
    assert publisher.is_connected()


@pytest.mark.integration
def test_mqtt_3_1_1_cannot_learn_the_maximum_packet_size(
    restricted: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    transport = connect(restricted, opened, unique("big-311"), protocol="3.1.1")
    assert transport.max_packet_size is None


# -- failure reason codes ---------------------------------------------------------------------


@pytest.mark.integration
def test_refused_publish_reports_the_reason_code_on_mqtt5_only(
    restricted: MosquittoProcess, opened: list[MqttTransport]
) -> None:
    v5 = connect(restricted, opened, unique("acl-5"))
    with pytest.raises(TransportError, match=r"refused the publish to 'secret/x': Not authorized \(0x87\)"):
        v5.publish("secret/x", b"denied", qos=1)
    v5.publish("open/x", b"allowed", qos=1)  # the refusal did not break the connection
    v5.publish("secret/x", b"QoS 0 has no PUBACK to carry a refusal", qos=0)

    v311 = connect(restricted, opened, unique("acl-311"), protocol="3.1.1")
    v311.publish("secret/x", b"3.1.1: acknowledged and silently dropped", qos=1)


@pytest.mark.integration
def test_refused_subscription_reports_the_reason_code(dynsec: MosquittoProcess, opened: list[MqttTransport]) -> None:
    v5 = connect(dynsec, opened, unique("dynsec-5"))
    v5.subscribe("open/#")
    with pytest.raises(TransportError, match=r"refused subscription: Not authorized \(0x87\)"):
        v5.subscribe("secret/#")
    with pytest.raises(TransportError, match="refused the publish to 'secret/x': Not authorized"):
        v5.publish("secret/x", b"denied", qos=1)

    v311 = connect(dynsec, opened, unique("dynsec-311"), protocol="3.1.1")
    with pytest.raises(TransportError, match=r"refused subscription: Unspecified error \(0x80\)"):
        v311.subscribe("secret/#")  # 3.1.1's SUBACK has one failure code for everything

    early = connect(dynsec, opened, unique("dynsec-early"), start=False)
    early.subscribe("secret/#")  # recorded, sent on connect
    with pytest.raises(TransportError, match="Not authorized"):
        early.start()


@pytest.mark.integration
def test_protocol_5_against_a_3_1_1_only_broker_names_the_reason(
    embedded_broker: EmbeddedBroker, opened: list[MqttTransport]
) -> None:
    transport = connect(embedded_broker, opened, unique("v5-on-amqtt"), start=False)
    with pytest.raises(TransportError, match=r"refused the connection: Unsupported protocol version \(0x84\)"):
        transport.start()
    with_will = MqttTransport(
        MqttConfig(
            host=embedded_broker.host,
            port=embedded_broker.port,
            client_id=unique("v5-will-on-amqtt"),
            protocol="5",
            will=Will(topic="v5/will", payload=b"offline"),
            connect_timeout=1.0,
        )
    )
    opened.append(with_will)
    with pytest.raises(TransportError, match="no CONNACK"):  # amqtt 0.12 neither answers nor hangs up
        with_will.start()


# -- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expiry_s", "interval"),
    [(None, None), (0.001, 1), (1, 1), (1.0001, 2), (59.5, 60), (3600, 3600), (1e12, MAX_FOUR_BYTE_INTEGER)],
)
def test_message_expiry_interval_rounds_up_to_whole_seconds(expiry_s: float | None, interval: int | None) -> None:
    assert message_expiry_interval(expiry_s) == interval


def test_session_expiry_interval() -> None:
    assert session_expiry_interval(True, None) == 0
    assert session_expiry_interval(False, None) == MAX_FOUR_BYTE_INTEGER
    assert session_expiry_interval(False, 60) == 60


@pytest.mark.parametrize(
    ("topic", "payload_size", "qos", "properties_size", "expected"),
    [
        ("a/b", 0, 0, 0, 1 + 1 + 2 + 3),
        ("a/b", 10, 1, 1, 1 + 1 + 2 + 3 + 2 + 1 + 10),
        ("ü", 0, 0, 0, 1 + 1 + 2 + 2),
        ("t", 127 - 3, 0, 0, 1 + 1 + 127),  # remaining length 127: one length byte
        ("t", 128 - 3, 0, 0, 1 + 2 + 128),  # 128: two
        ("t", 16384 - 3, 0, 0, 1 + 3 + 16384),  # 16384: three
    ],
)
def test_publish_packet_size(topic: str, payload_size: int, qos: int, properties_size: int, expected: int) -> None:
    assert publish_packet_size(topic, payload_size, qos=qos, properties_size=properties_size) == expected


def test_mqtt_config_accepts_the_protocol_and_session_settings() -> None:
    for protocol in ("auto", "5", "3.1.1"):
        assert MqttConfig(host="h", client_id="c", protocol=protocol).protocol == protocol
    assert MqttConfig(host="h", client_id="c").protocol == "auto"
    config = MqttConfig(host="h", client_id="c", clean_session=False, session_expiry_s=MAX_FOUR_BYTE_INTEGER)
    assert config.session_expiry_s == MAX_FOUR_BYTE_INTEGER


def test_in_memory_transport_accepts_and_ignores_expiry() -> None:
    broker = InMemoryBroker()
    with InMemoryTransport(broker, "a") as transport:
        transport.subscribe("t")
        transport.publish("t", b"x", expiry_s=0.001)
        transport.publish("r", b"kept", retain=True, expiry_s=0.001)
        time.sleep(0.01)
        assert transport.receive(timeout=1) == InboundMessage("t", b"x")
    assert broker.retained() == {"r": b"kept"}, "retained messages do not expire in memory"
