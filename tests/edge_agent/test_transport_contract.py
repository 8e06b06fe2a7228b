"""One set of Transport contract tests, run against every backend.

Backends: the in-memory hub, ``MqttTransport`` against a real Mosquitto subprocess speaking
MQTT 5 and, separately, MQTT 3.1.1, and ``MqttTransport`` with ``protocol="auto"`` against the
embedded amqtt broker (which speaks 3.1.1 only, so "auto" must fall back). Brokers are shared by the session, so every
test uses its own topic prefix and client ids. "Nothing arrives" is checked by waiting
``backend.quiet`` seconds, which is long for real brokers and short in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker_server.embedded_broker import EmbeddedBroker
from broker_server.mosquitto_process import MosquittoProcess, free_port
from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport.base import InboundMessage, Transport, Will
from edge_agent.transport.memory import (
    InMemoryBroker,
    InMemoryTransport,
    topic_matches,
    validate_topic,
    validate_topic_filter,
)
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url, reconnect_delay

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
ONE_MIB = 1024 * 1024

# Runs in a child process so that SIGKILL cuts its TCP connection exactly like a crashed device.
_DYING_CLIENT = """
import sys, time
from edge_agent.transport.base import Will
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
host, port, client_id, topic, payload_hex, protocol = sys.argv[1:]
will = Will(topic=topic, payload=bytes.fromhex(payload_hex))
MqttTransport(MqttConfig(host=host, port=int(port), client_id=client_id, will=will, protocol=protocol)).start()
print("connected", flush=True)
time.sleep(600)
"""


@dataclass
class Backend:
    """How the contract tests create, kill and misconfigure transports of one kind."""

    name: str
    quiet: float
    factory: Callable[[str, Will | None], Transport]
    die_abruptly: Callable[[str, Will], None]
    """Connect a client with ``will``, then make it vanish without a DISCONNECT."""
    unreachable: Callable[[], Transport]
    """A transport whose broker is not there."""
    expected_protocol: str | None = None
    """What ``MqttTransport.protocol_in_use`` must be once started (``None``: not an MQTT backend)."""
    opened: list[Transport] = field(default_factory=list)

    def create(self, client_id: str, *, will: Will | None = None) -> Transport:
        transport = self.factory(f"{self.name}-{client_id}-{uuid.uuid4().hex[:8]}", will)
        self.opened.append(transport)
        return transport

    def connect(self, client_id: str, *, will: Will | None = None) -> Transport:
        transport = self.create(client_id, will=will)
        transport.start()
        if isinstance(transport, MqttTransport):
            assert transport.protocol_in_use == self.expected_protocol
        return transport


def _memory_backend() -> Backend:
    broker = InMemoryBroker()

    def die(client_id: str, will: Will) -> None:
        transport = InMemoryTransport(broker, client_id, will=will)
        transport.start()
        transport.kill()

    def unreachable() -> Transport:
        down = InMemoryBroker()
        down.close()
        return InMemoryTransport(down, "unreachable")

    return Backend(
        name="memory",
        quiet=0.05,
        factory=lambda client_id, will: InMemoryTransport(broker, client_id, will=will),
        die_abruptly=die,
        unreachable=unreachable,
    )


def _mqtt_backend(name: str, url: str, *, protocol: str, expected_protocol: str) -> Backend:
    host, port = parse_mqtt_url(url)

    def config(client_id: str, will: Will | None, *, port: int = port) -> MqttConfig:
        return MqttConfig(
            host=host,
            port=port,
            client_id=client_id,
            will=will,
            connect_timeout=5.0,
            publish_timeout=10.0,
            protocol=protocol,
        )

    def die(client_id: str, will: Will) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        args = [host, str(port), client_id, will.topic, will.payload.hex(), protocol]
        with subprocess.Popen(
            [sys.executable, "-c", _DYING_CLIENT, *args], stdout=subprocess.PIPE, cwd=REPO_ROOT, env=env
        ) as child:
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == b"connected", "dying client failed to connect"
            finally:
                child.kill()
                child.wait(10)

    return Backend(
        name=name,
        quiet=1.0,
        factory=lambda client_id, will: MqttTransport(config(client_id, will)),
        die_abruptly=die,
        unreachable=lambda: MqttTransport(config("unreachable", None, port=free_port())),
        expected_protocol=expected_protocol,
    )


# backend name -> (broker fixture, MqttConfig.protocol, expected protocol_in_use)
MQTT_BACKENDS = {
    "mosquitto-5": ("mosquitto", "5", "5"),
    "mosquitto-3.1.1": ("mosquitto", "3.1.1", "3.1.1"),
    "amqtt": ("embedded_broker", "auto", "3.1.1"),  # amqtt 0.12 speaks 3.1.1 only
}


@pytest.fixture(params=["memory", *(pytest.param(name, marks=pytest.mark.integration) for name in MQTT_BACKENDS)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        made = _memory_backend()
    else:
        fixture, protocol, expected = MQTT_BACKENDS[kind]
        broker = request.getfixturevalue(fixture)
        made = _mqtt_backend(kind, broker.url, protocol=protocol, expected_protocol=expected)
    yield made
    for transport in made.opened:
        transport.close()


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


def receive_n(transport: Transport, count: int, timeout: float = 10.0) -> list[InboundMessage]:
    """Collect exactly ``count`` messages or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    received: list[InboundMessage] = []
    while len(received) < count:
        message = transport.receive(timeout=max(0.0, deadline - time.monotonic()))
        if message is None:
            pytest.fail(f"got {len(received)} of {count} messages within {timeout}s: {received!r}")
        received.append(message)
    return received


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


# -- contract: every backend ----------------------------------------------------------------


def test_binary_payloads_round_trip_unchanged(backend: Backend, prefix: str) -> None:
    payloads = {
        f"{prefix}/all-bytes": (bytes(range(256)), 0),
        f"{prefix}/one-mib": (random.Random(7).randbytes(ONE_MIB), 1),
        f"{prefix}/empty": (b"", 1),
        f"{prefix}/nul": (b"\x00", 2),
    }
    subscriber = backend.connect("sub")
    publisher = backend.connect("pub")
    subscriber.subscribe(f"{prefix}/#")

    for topic, (payload, qos) in payloads.items():
        publisher.publish(topic, payload, qos=qos)

    received = {m.topic: m.payload for m in receive_n(subscriber, len(payloads))}
    assert received == {topic: payload for topic, (payload, _) in payloads.items()}


def test_wildcard_filters_select_matching_topics_only(backend: Backend, prefix: str) -> None:
    subscriber = backend.connect("sub")
    publisher = backend.connect("pub")
    subscriber.subscribe(f"{prefix}/+/temp")
    subscriber.subscribe(f"{prefix}/dev/#")
    matching = [f"{prefix}/a/temp", f"{prefix}/b/temp", f"{prefix}/dev", f"{prefix}/dev/x/y"]
    not_matching = [f"{prefix}/a/b/temp", f"{prefix}/temp", f"{prefix}/a/temp/x", f"{prefix}/device"]

    for topic in not_matching + matching:
        publisher.publish(topic, topic.encode())

    received = receive_n(subscriber, len(matching))
    assert sorted(m.topic for m in received) == sorted(matching)
    assert all(m.payload == m.topic.encode() for m in received)
    assert subscriber.receive(timeout=backend.quiet) is None


def test_retained_message_reaches_late_subscriber_until_cleared(backend: Backend, prefix: str) -> None:
    topic = f"{prefix}/state"
    publisher = backend.connect("pub")
    publisher.publish(topic, b"v1", retain=True)
    publisher.publish(topic, b"v2", retain=True)

    late = backend.connect("late")
    late.subscribe(topic)
    assert late.receive(timeout=10) == InboundMessage(topic, b"v2")
    assert late.receive(timeout=backend.quiet) is None

    publisher.publish(topic, b"", retain=True)
    assert late.receive(timeout=10) == InboundMessage(topic, b""), "live subscribers see the clearing message"

    later = backend.connect("later")
    later.subscribe(topic)
    assert later.receive(timeout=backend.quiet) is None


def test_publish_accepts_a_message_expiry_and_rejects_nonsense(backend: Backend, prefix: str) -> None:
    """A live subscriber gets an expiring message at once on every backend (MQTT 5 sets the Message
    Expiry Interval, 3.1.1 and the in-memory hub ignore it); test_mqtt_v5.py checks the expiry."""
    subscriber = backend.connect("sub")
    publisher = backend.connect("pub")
    subscriber.subscribe(f"{prefix}/#")
    publisher.publish(f"{prefix}/a", b"short-lived", expiry_s=0.2)
    publisher.publish(f"{prefix}/b", b"long-lived", expiry_s=3600, retain=True)
    assert receive_n(subscriber, 2) == [
        InboundMessage(f"{prefix}/a", b"short-lived"),
        InboundMessage(f"{prefix}/b", b"long-lived"),
    ]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TransportError, match="expiry_s"):
            publisher.publish(f"{prefix}/a", b"x", expiry_s=bad)
    publisher.publish(f"{prefix}/b", b"", retain=True)


def test_will_is_published_when_a_client_dies_abruptly(backend: Backend, prefix: str) -> None:
    will = Will(topic=f"{prefix}/status/dev1", payload=b"offline\x00\xff")
    observer = backend.connect("observer")
    observer.subscribe(f"{prefix}/status/+")

    backend.die_abruptly(f"{backend.name}-dying-{uuid.uuid4().hex[:8]}", will)

    assert observer.receive(timeout=10) == InboundMessage(will.topic, will.payload)
    late = backend.connect("late")
    late.subscribe(will.topic)
    assert late.receive(timeout=10) == InboundMessage(will.topic, will.payload), "will was retained"
    observer.publish(will.topic, b"", retain=True)


def test_will_is_not_published_on_clean_close(backend: Backend, prefix: str) -> None:
    will = Will(topic=f"{prefix}/status/dev1", payload=b"offline")
    observer = backend.connect("observer")
    observer.subscribe(f"{prefix}/status/+")
    device = backend.connect("device", will=will)

    device.close()
    device.close()  # idempotent

    assert observer.receive(timeout=backend.quiet) is None
    late = backend.connect("late")
    late.subscribe(will.topic)
    assert late.receive(timeout=backend.quiet) is None


def test_receive_returns_none_after_timeout(backend: Backend) -> None:
    transport = backend.connect("idle")
    started = time.monotonic()
    assert transport.receive(timeout=0.3) is None
    assert 0.25 <= time.monotonic() - started < 2.0
    assert transport.receive(timeout=0) is None


def test_subscription_made_before_start_is_applied_on_connect(backend: Backend, prefix: str) -> None:
    publisher = backend.connect("pub")
    publisher.publish(f"{prefix}/cfg", b"retained", retain=True)
    subscriber = backend.create("sub")
    subscriber.subscribe(f"{prefix}/#")
    subscriber.start()

    assert subscriber.receive(timeout=10) == InboundMessage(f"{prefix}/cfg", b"retained")
    publisher.publish(f"{prefix}/live", b"live")
    assert subscriber.receive(timeout=10) == InboundMessage(f"{prefix}/live", b"live")
    publisher.publish(f"{prefix}/cfg", b"", retain=True)


def test_publish_requires_a_started_open_transport(backend: Backend, prefix: str) -> None:
    transport = backend.create("lifecycle")
    with pytest.raises(TransportError):
        transport.publish(f"{prefix}/x", b"too early")

    transport.start()
    transport.publish(f"{prefix}/x", b"fine")
    transport.close()

    with pytest.raises(TransportError):
        transport.publish(f"{prefix}/x", b"too late", qos=0)
    with pytest.raises(TransportError):
        transport.subscribe(f"{prefix}/#")
    started = time.monotonic()
    assert transport.receive(timeout=None) is None, "a closed transport must not block readers"
    assert time.monotonic() - started < 1.0
    with pytest.raises(TransportError):
        transport.start()


def test_invalid_topics_are_rejected_before_reaching_the_broker(backend: Backend) -> None:
    transport = backend.connect("strict")
    for topic in ("", "a/+", "a/#", "a\x00b"):
        with pytest.raises(TransportError):
            transport.publish(topic, b"x")
    for topic_filter in ("", "a/#/b", "a/b#", "a/+b"):
        with pytest.raises(TransportError):
            transport.subscribe(topic_filter)
    with pytest.raises(TransportError):
        transport.publish("a/b", b"x", qos=3)


def test_start_against_missing_broker_raises_transport_error(backend: Backend) -> None:
    transport = backend.unreachable()
    backend.opened.append(transport)
    started = time.monotonic()
    with pytest.raises(TransportError):
        transport.start()
    assert time.monotonic() - started < 6.0  # MQTT backends use connect_timeout=5


# -- MQTT-specific behaviour ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["auto", "5", "3.1.1"])
def test_start_gives_up_when_the_peer_never_sends_connack(protocol: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes the handshake; nobody ever answers CONNECT
        port = silent.getsockname()[1]
        config = MqttConfig(host="127.0.0.1", port=port, client_id="silent", connect_timeout=1.0, protocol=protocol)
        transport = MqttTransport(config)
        started = time.monotonic()
        with pytest.raises(TransportError, match="CONNACK"):
            transport.start()
        assert 0.9 <= time.monotonic() - started < 3.0
        assert not transport.is_connected()
        transport.close()


@pytest.mark.integration
def test_auto_falls_back_to_3_1_1_when_the_peer_hangs_up_on_mqtt5() -> None:
    """A broker may close the connection instead of answering an MQTT 5 CONNECT with a CONNACK."""
    levels: list[int] = []

    def hang_up(server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(2.0)
                    connect = conn.recv(16)  # fixed header, length, "\x00\x04MQTT", protocol level
                    if len(connect) > 8:
                        levels.append(connect[8])

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        threading.Thread(target=hang_up, args=(server,), daemon=True).start()
        config = MqttConfig(host="127.0.0.1", port=server.getsockname()[1], client_id="hung-up", connect_timeout=1.0)
        transport = MqttTransport(config)
        with pytest.raises(TransportError, match="CONNACK"):  # 3.1.1 gets no CONNACK either
            transport.start()
        transport.close()
    assert levels[:2] == [5, 4], "one MQTT 5 CONNECT, then MQTT 3.1.1 only"
    assert set(levels[1:]) == {4}


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["auto", "5", "3.1.1"])
def test_start_raises_when_the_broker_refuses_the_client(protocol: str, tmp_path: Path) -> None:
    with MosquittoProcess(tmp_path, allow_anonymous=False) as broker:
        transport = MqttTransport(MqttConfig(host=broker.host, port=broker.port, client_id="anon", protocol=protocol))
        with pytest.raises(TransportError, match="refused the connection: Not authorized"):
            transport.start()
        assert not transport.is_connected()
        transport.close()


@pytest.mark.integration
@pytest.mark.parametrize("with_will", [False, True], ids=["no-will", "will"])
def test_auto_protocol_is_mqtt5_on_mosquitto_and_3_1_1_on_amqtt(
    with_will: bool, mosquitto: MosquittoProcess, embedded_broker: EmbeddedBroker, prefix: str
) -> None:
    """amqtt never answers an MQTT 5 CONNECT that carries a will: "auto" must not wait for that."""
    will = Will(topic=f"{prefix}/status", payload=b"offline") if with_will else None
    for broker, expected in ((mosquitto, "5"), (embedded_broker, "3.1.1")):
        transport = MqttTransport(
            MqttConfig(host=broker.host, port=broker.port, client_id=f"auto-{uuid.uuid4().hex[:8]}", will=will)
        )
        with pytest.raises(TransportError, match="not started"):
            _ = transport.protocol_in_use
        started = time.monotonic()
        with transport:
            assert time.monotonic() - started < 3.0, "the connect timeout (10 s) must not be involved"
            assert transport.protocol_in_use == expected
            assert transport.is_connected()


@pytest.mark.integration
@pytest.mark.parametrize(
    "kind",
    [
        "mosquitto-5",
        "mosquitto-3.1.1",
        pytest.param(
            "amqtt",
            marks=pytest.mark.xfail(
                strict=True,
                reason="amqtt 0.12 treats every session as anonymous when allow_anonymous is on, "
                "and drops anonymous sessions on disconnect",
            ),
        ),
    ],
)
def test_persistent_session_keeps_messages_published_while_offline(
    kind: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    fixture, protocol, _ = MQTT_BACKENDS[kind]
    broker = request.getfixturevalue(fixture)
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"

    def transport(client_id: str, *, clean: bool) -> MqttTransport:
        config = MqttConfig(
            host=broker.host, port=broker.port, client_id=client_id, clean_session=clean, protocol=protocol
        )
        return MqttTransport(config)

    device = transport(client_id, clean=False)
    device.start()
    device.subscribe(f"{prefix}/cmd", qos=1)
    device.close()
    with transport(f"sender-{client_id}", clean=True) as sender:
        sender.publish(f"{prefix}/cmd", b"while offline", qos=1)
    with transport(client_id, clean=False) as device:  # no subscribe: the broker kept it
        assert device.receive(timeout=5) == InboundMessage(f"{prefix}/cmd", b"while offline")
    with transport(client_id, clean=True):  # drop the session from the shared broker
        pass


@pytest.mark.integration
@pytest.mark.parametrize("kind", list(MQTT_BACKENDS))
def test_reconnects_and_resubscribes_after_broker_restart(kind: str, tmp_path: Path) -> None:
    port = free_port()
    fixture, protocol, expected_protocol = MQTT_BACKENDS[kind]

    def new_broker() -> MosquittoProcess | EmbeddedBroker:
        broker = MosquittoProcess(tmp_path, port=port) if fixture == "mosquitto" else EmbeddedBroker(port=port)
        broker.start()
        return broker

    def config(client_id: str) -> MqttConfig:
        return MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id=client_id,
            reconnect_min_delay=0.05,
            reconnect_max_delay=0.2,
            connect_timeout=5.0,
            publish_timeout=5.0,
            protocol=protocol,
        )

    broker = new_broker()
    birth = Will(topic="restart/birth", payload=b"online again", retain=True)
    subscriber = MqttTransport(dataclasses.replace(config("re-sub"), birth=birth))
    publisher = MqttTransport(config("re-pub"))
    try:
        subscriber.start()
        publisher.start()
        subscriber.subscribe("restart/topic")

        broker.stop()
        wait_until(lambda: not subscriber.is_connected() and not publisher.is_connected(), 10)
        with pytest.raises(TransportError):
            publisher.publish("restart/topic", b"while down")

        broker = new_broker()
        wait_until(lambda: subscriber.is_connected() and publisher.is_connected(), 15)
        # The resubscription races with our publish, so publish until one copy gets through.
        deadline = time.monotonic() + 10
        received: list[InboundMessage] = []
        while not any(m.payload == b"back" for m in received) and time.monotonic() < deadline:
            publisher.publish("restart/topic", b"back")
            while (message := subscriber.receive(timeout=0.2)) is not None:
                received.append(message)
        assert InboundMessage("restart/topic", b"back") in received
        assert subscriber.protocol_in_use == publisher.protocol_in_use == expected_protocol, "kept across reconnects"
        # The restarted broker has no retained messages of its own: the birth came back on reconnect.
        with MqttTransport(config("re-observer")) as observer:
            observer.subscribe("restart/birth")
            assert observer.receive(timeout=5) == InboundMessage("restart/birth", b"online again")
    finally:
        subscriber.close()
        publisher.close()
        broker.stop()


# -- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),
        ("a/+/c", "a//c", True),
        ("+/+", "/x", True),
        ("+", "a", True),
        ("+", "a/b", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/#/b", "a/x/b", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_topic_validation() -> None:
    validate_topic("a/b c/ü")
    validate_topic_filter("+/a/#")
    validate_topic_filter("#")
    with pytest.raises(TransportError):
        validate_topic("x" * 65536)
    with pytest.raises(TransportError):
        validate_topic_filter("a/##")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884)),
        ("mqtt://broker.example", ("broker.example", 1883)),
        ("mqtt://broker.example/", ("broker.example", 1883)),
        ("  mqtt://[::1]:8883 ", ("::1", 8883)),
    ],
)
def test_parse_mqtt_url_accepts(url: str, expected: tuple[str, int]) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "broker:1883",
        "tcp://broker:1883",
        "mqtts://broker:8883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://broker:99999",
        "mqtt://broker:port",
        "mqtt://broker:0",
        "mqtt://user:secret@broker:1883",
        "mqtt://broker:1883/topic",
        "mqtt://broker:1883?x=1",
    ],
)
def test_parse_mqtt_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_mqtt_url(url)


@pytest.mark.parametrize(
    "bad",
    [
        {"host": ""},
        {"client_id": ""},
        {"port": 0},
        {"connect_timeout": 0},
        {"reconnect_min_delay": 5.0, "reconnect_max_delay": 1.0},
        {"reconnect_jitter": -0.1},
        {"password": "secret"},
        {"protocol": "4"},
        {"protocol": "mqtt5"},
        {"protocol": ""},
        {"session_expiry_s": 60},  # needs clean_session=False
        {"clean_session": False, "session_expiry_s": 0},
        {"clean_session": False, "session_expiry_s": 2**32},
        {"clean_session": False, "session_expiry_s": 1.5},
    ],
)
def test_mqtt_config_rejects_nonsense(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"host": "localhost", "client_id": "dev1", **bad}
    with pytest.raises(ConfigError):
        MqttConfig(**fields)  # type: ignore[arg-type]


def test_reconnect_delay_doubles_up_to_the_cap_plus_bounded_jitter() -> None:
    rng = random.Random(42)
    delays = [reconnect_delay(n, min_delay=1.0, max_delay=8.0, jitter=0.5, rng=rng) for n in range(6)]
    for attempt, delay in enumerate(delays):
        base = min(8.0, 2.0**attempt)
        assert base <= delay <= 1.5 * base
    replay = random.Random(42)
    assert delays == [reconnect_delay(n, min_delay=1.0, max_delay=8.0, jitter=0.5, rng=replay) for n in range(6)]
    assert reconnect_delay(10_000, min_delay=1.0, max_delay=8.0, jitter=0.0, rng=rng) == 8.0


def test_reconnect_delays_of_a_fleet_are_spread_out() -> None:
    """Without jitter every device would retry at exactly the same instant after a broker restart."""
    delays = {
        round(reconnect_delay(3, min_delay=1.0, max_delay=60.0, jitter=1.0, rng=random.Random(device)), 3)
        for device in range(100)
    }
    assert len(delays) > 90


def test_in_memory_client_id_takeover_disconnects_the_old_client() -> None:
    broker = InMemoryBroker()
    old = InMemoryTransport(broker, "dev1", will=Will(topic="s/dev1", payload=b"offline"))
    new = InMemoryTransport(broker, "dev1")
    old.start()
    new.start()
    with pytest.raises(TransportError):
        old.publish("a", b"x")
    old.kill()  # the broker no longer holds old's session, so no will either
    assert broker.retained() == {}
    assert broker.connected_clients() == ["dev1"]
    new.close()
