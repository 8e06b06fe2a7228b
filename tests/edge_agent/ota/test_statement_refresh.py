"""The server keeps its retained signed statements fresh (issue #7): ``StatementRefresher`` re-signs
every retained MODEL once a quarter of its lifetime is left — same ``issued_at``, later
``expires_at`` — forgets what the broker no longer retains, and retries a failed publish.

The publisher and the statements are real, the signer's wall clock is fake; the broker is the
in-memory hub, and once a real Mosquitto (a device connecting after the original statement
expired gets the renewed retained copy).
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from broker_server.models import ModelPublisher
from broker_server.mosquitto_process import MosquittoProcess
from broker_server.pki.release_signer import ReleaseSigner
from broker_server.pki.statement_refresh import StatementRefresher
from edge_agent.crypto.freshness import StatementExpired
from edge_agent.crypto.signing import SigningKey
from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import TransportError
from edge_agent.protocol.messages import decode_message, encode_message
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from edge_agent.transport.mqtt import MqttConfig, MqttTransport

KEY = SigningKey.generate()
TRUSTED = TrustedKeys((KEY.public_key,))
T0 = 1_767_225_600.0
HOUR = 3600.0
TOPICS = Topics("fresh/v1")
MODEL = ModelMessage(channel="current", version=1, bundle_digest="ab" * 32, archive_sha256="cd" * 32, archive_size=9)


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """An in-memory transport whose publishes fail while ``down`` (a broker that went away)."""

    def __init__(self, inner: InMemoryTransport) -> None:
        self.inner, self.down = inner, False

    def start(self) -> None:
        self.inner.start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s=None) -> None:
        if self.down:
            raise TransportError("broker unreachable")
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        return self.inner.receive(timeout=timeout)

    def close(self) -> None:
        self.inner.close()


def hub(name: str) -> tuple[InMemoryBroker, InMemoryTransport]:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, name)
    transport.start()
    return broker, transport


def listener(broker: InMemoryBroker, topic: str) -> InMemoryTransport:
    device = InMemoryTransport(broker, f"dev-{uuid.uuid4().hex[:6]}")
    device.subscribe(topic)
    device.start()
    return device


def models(device: InMemoryTransport | MqttTransport) -> list[ModelMessage]:
    got = []
    while (inbound := device.receive(timeout=0.05)) is not None:
        if inbound.payload:
            message = decode_message(inbound.payload)
            assert isinstance(message, ModelMessage)
            got.append(message)
    return got


def test_a_channel_announcement_is_re_signed_before_it_expires(digits_bundle: Bundle) -> None:
    clock = WallClock()
    signer = ReleaseSigner(KEY, clock=clock, lifetime_s=24 * HOUR)
    broker, inner = hub("server")
    server = StatementRefresher(inner, signer)
    publisher = ModelPublisher(TOPICS)
    publisher.sign_with(signer.sign)
    announced = publisher.announce(server, "current", 1, digits_bundle.directory)
    device = listener(broker, TOPICS.model_channel("current"))
    assert models(device) == [announced]  # the retained copy
    clock.now += 18 * HOUR - 1  # not yet: more than a quarter of the lifetime is left
    assert server.receive(timeout=0) is None and models(device) == [] and server.refresh() == 0
    clock.now += 1
    assert server.receive(timeout=0) is None  # every receive first re-signs what is due
    (renewed,) = models(device)
    assert renewed.issued_at == announced.issued_at and renewed.expires_at == announced.expires_at + 18 * 3_600_000
    clock.now += 10 * HOUR  # the first copy has expired, the renewed one holds
    assert TRUSTED.check_statement(renewed, now_ms=signer.now_ms()) == KEY.key_id
    with pytest.raises(StatementExpired):
        TRUSTED.check_statement(announced, now_ms=signer.now_ms())
    # a device connecting now gets the renewed copy from the broker
    assert models(listener(broker, TOPICS.model_channel("current"))) == [renewed]
    assert server.counters["resigned"] == 1 and server.retained() == {TOPICS.model_channel("current"): renewed}


def test_only_what_the_broker_still_retains_is_re_signed() -> None:
    clock = WallClock()
    signer = ReleaseSigner(KEY, clock=clock, lifetime_s=HOUR)
    broker, inner = hub("server")
    server = StatementRefresher(inner, signer)
    channel, inbox, other = TOPICS.model_channel("current"), TOPICS.tasks("dev-7"), TOPICS.tasks("dev-8")
    server.publish(channel, encode_message(signer.sign(MODEL)), retain=True)
    directed = signer.sign(dataclasses.replace(MODEL, channel="dev-7", rollout_id="r-1"))
    server.publish(inbox, encode_message(directed), retain=True)
    server.publish(other, encode_message(signer.sign(MODEL)), retain=True)
    clock.now += 60
    v2 = signer.sign(dataclasses.replace(MODEL, version=2))
    server.publish(channel, encode_message(v2), retain=True)  # replaces v1 on the channel
    server.publish(other, b"", retain=True)  # clears dev-8's inbox
    server.publish(TOPICS.tasks("dev-9"), encode_message(MODEL), retain=True)  # unsigned: nothing to renew
    server.publish(TOPICS.tasks("dev-7"), b"a task", retain=False)  # not retained: changes nothing
    assert set(server.retained()) == {channel, inbox}
    devices = {topic: listener(broker, topic) for topic in (channel, inbox, other)}
    for device in devices.values():
        models(device)  # drain the retained copies
    clock.now += HOUR  # everything is due
    assert server.refresh() == 2
    (fresh_v2,) = models(devices[channel])
    (fresh_directed,) = models(devices[inbox])
    assert (fresh_v2.version, fresh_v2.issued_at) == (2, v2.issued_at) and fresh_v2.expires_at > v2.expires_at
    assert fresh_directed.issued_at == directed.issued_at and fresh_directed.rollout_id == "r-1"
    assert models(devices[other]) == []
    assert server.refresh() == 0  # not due again for another three quarters of an hour


def test_a_failed_refresh_is_retried_and_never_raised() -> None:
    clock = WallClock()
    signer = ReleaseSigner(KEY, clock=clock, lifetime_s=HOUR)
    broker, inner = hub("server")
    flaky = Flaky(inner)
    server = StatementRefresher(flaky, signer, retry_s=60)
    first = signer.sign(MODEL)
    server.publish(TOPICS.model_channel("current"), encode_message(first), retain=True)
    device = listener(broker, TOPICS.model_channel("current"))
    models(device)
    clock.now += HOUR * 0.75
    flaky.down = True
    assert server.receive(timeout=0) is None  # the failure is logged, not raised into the loop
    assert server.counters["failed"] == 1 and server.refresh() == 0  # not retried before retry_s
    flaky.down = False
    clock.now += 59
    assert server.refresh() == 0
    clock.now += 1
    assert server.refresh() == 1
    (renewed,) = models(device)
    assert renewed.issued_at == first.issued_at and renewed.expires_at > first.expires_at


def test_a_refresher_needs_a_signer_with_a_lifetime() -> None:
    _, inner = hub("server")
    with pytest.raises(ValueError, match="statement lifetime"):
        StatementRefresher(inner, ReleaseSigner(KEY))


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_mosquitto_retains_the_renewed_statement_for_devices_that_connect_later(mosquitto: MosquittoProcess) -> None:
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"fresh-{run}/v1")
    clock = WallClock()
    signer = ReleaseSigner(KEY, clock=clock, lifetime_s=HOUR)
    server = StatementRefresher(
        MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"fresh-srv-{run}")), signer
    )
    server.start()
    devices = []
    try:
        first = signer.sign(MODEL)
        server.publish(topics.model_channel("current"), encode_message(first), qos=1, retain=True)
        clock.now += HOUR * 0.75
        assert server.receive(timeout=0.1) is None and server.counters["resigned"] == 1
        clock.now += HOUR  # the first copy expired long ago
        device = MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"fresh-dev-{run}"))
        devices.append(device)
        device.subscribe(topics.model_channel("current"))
        device.start()
        inbound = device.receive(timeout=5.0)
        assert inbound is not None
        retained = decode_message(inbound.payload)
        assert isinstance(retained, ModelMessage) and retained.issued_at == first.issued_at
        assert TRUSTED.check_statement(retained, now_ms=signer.now_ms()) == KEY.key_id
    finally:
        server.publish(topics.model_channel("current"), b"", qos=1, retain=True)  # leave no retained message
        server.close()
        for device in devices:
            device.close()
