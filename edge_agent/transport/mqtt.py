"""MQTT 5 / 3.1.1 :class:`~edge_agent.transport.base.Transport` over paho-mqtt.

This is the only module in fedflock that imports paho; its configuration and paho-free helpers
live in ``mqtt_config.py``. paho's network thread (``loop_start``) does all socket I/O; its
callbacks only copy data into queues and flags, never run user code.

Choices worth knowing:

* ``protocol="auto"`` probes with a bare MQTT 5 CONNECT first (amqtt 0.12 never answers one
  with a will) and falls back to 3.1.1 for this transport and its reconnects.
* MQTT 5 only: message and session expiry, failure reason codes in CONNACK/SUBACK/PUBACK raised
  as :class:`TransportError` naming the code, and the broker's Maximum Packet Size enforced
  before sending (paho does not check it; the broker would disconnect us). On 3.1.1 expiries
  are ignored and a broker that refuses a publish still acknowledges it. paho 2.2 ignores PUBREC
  reason codes, so a refused QoS 2 publish looks successful even on MQTT 5.
* paho's reconnect backoff has no jitter (a fleet would reconnect in lockstep): each attempt
  gets our jittered exponential :func:`reconnect_delay` through ``reconnect_delay_set``.
* paho queues a publish made while disconnected and sends it after the reconnect, so a caller
  retrying during an outage would queue one copy per retry: publishing while disconnected
  raises instead. A QoS 1 message whose PUBACK timed out may still be delivered after a
  reconnect, so receivers must tolerate duplicates.
* TLS (``config.tls``): ``start()`` reads the certificate and password files (``tls.py``) and
  hands paho one verifying SSLContext; a refused client certificate fails ``start()`` at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.errors import TransportError
from edge_agent.transport import mqtt_config, tls
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.memory import Inbox, validate_qos, validate_topic, validate_topic_filter
from edge_agent.transport.mqtt_config import Backoff, MqttConfig, parse_broker_url, parse_mqtt_url, reconnect_delay
from edge_agent.transport.tls import TlsConfig

__all__ = ["MqttConfig", "MqttTransport", "TlsConfig", "parse_broker_url", "parse_mqtt_url", "reconnect_delay"]

_log = logging.getLogger(__name__)


class MqttTransport:
    """:class:`~edge_agent.transport.base.Transport` over a real MQTT 5 or 3.1.1 broker.

    No I/O before :meth:`start`. Subscriptions are re-sent on every (re)connect, so they survive
    broker restarts even with clean sessions. Once closed it cannot be restarted.
    """

    def __init__(self, config: MqttConfig, *, rng: random.Random | None = None) -> None:
        self._config = config
        self._backoff = Backoff(config, rng)
        self._inbox = Inbox()
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._acks = mqtt_config.Acks()
        self._connack = threading.Event()
        self._connect_error: str | None = None
        self._resubscribe_mid: int | None = None
        self._closed = False
        self._protocol = config.protocol if config.protocol != mqtt_config.PROTOCOL_AUTO else mqtt_config.PROTOCOL_V5
        self._protocol_in_use: str | None = None
        self._max_packet_size: int | None = None
        self._last_disconnect: str | None = None
        self._secrets = tls.Secrets(password=config.password)  # start() reads config.tls and password_file

    def _disconnect_note(self) -> str:
        return f" (last disconnect: {self._last_disconnect})" if self._last_disconnect else ""

    @property
    def config(self) -> MqttConfig:
        return self._config

    def is_connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    @property
    def protocol_in_use(self) -> str:
        """``"5"`` or ``"3.1.1"``: what :meth:`start` negotiated (kept for every reconnect)."""
        if self._protocol_in_use is None:
            raise TransportError(f"transport {self._config.client_id!r} is not started")
        return self._protocol_in_use

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from the last MQTT 5 CONNACK; ``None`` if it set none."""
        return self._max_packet_size

    def start(self) -> None:
        cfg = self._config
        deadline = time.monotonic() + cfg.connect_timeout
        if self._client is None:  # ConfigError naming an unusable file, before any connection attempt
            self._secrets = tls.Secrets.load(cfg.tls, password=cfg.password, password_file=cfg.password_file)
        if cfg.protocol == mqtt_config.PROTOCOL_AUTO and self._client is None and not self._closed:
            self._protocol = mqtt_config.PROTOCOL_V5 if self._probe_v5(deadline) else mqtt_config.PROTOCOL_V311
        client = self._new_client()
        if client is None:
            return
        self._connect(client, deadline)
        self._protocol_in_use = self._protocol
        mid = self._resubscribe_mid
        if mid is not None:
            self._acks.await_suback(mid, max(0.0, deadline - time.monotonic()))

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        """Publish; QoS >= 1 waits for the PUBACK and raises if it carries a failure reason code
        (or never came: paho's ``wait_for_publish`` returns silently on timeout).

        ``expiry_s`` becomes the MQTT 5 Message Expiry Interval (whole seconds, rounded up); on
        MQTT 3.1.1 it is ignored. A payload that would make the PUBLISH packet larger than the
        broker's Maximum Packet Size is refused here instead of being sent.
        """
        validate_topic(topic)
        validate_qos(qos)
        interval = mqtt_config.message_expiry_interval(expiry_s)
        client = self._require_client()
        data = bytes(payload)
        properties = _properties(PacketTypes.PUBLISH, MessageExpiryInterval=interval) if self._v5 else None
        limit = self._max_packet_size
        if limit is not None:  # only ever set on MQTT 5, where an empty property block is 1 byte
            props_size = len(properties.pack()) if properties is not None else 1
            mqtt_config.check_packet_size(topic, len(data), qos=qos, properties_size=props_size, limit=limit)
        if not client.is_connected():  # paho would queue it and send it after a reconnect, once per retry
            raise TransportError(f"cannot publish to {topic!r}: not connected{self._disconnect_note()}")
        try:
            info = client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        try:
            info.wait_for_publish(timeout=self._config.publish_timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            timeout = self._config.publish_timeout
            raise TransportError(f"publish to {topic!r} not acknowledged within {timeout}s{self._disconnect_note()}")
        failure = self._acks.publish_failure(info.mid)
        if failure is not None:
            raise TransportError(f"broker refused the publish to {topic!r}: {failure}")

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Record the subscription and, if connected, wait for the SUBACK (else: sent on connect)."""
        validate_topic_filter(topic_filter)
        validate_qos(qos)
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._config.client_id!r} is closed")
            self._subscriptions[topic_filter] = qos
            client = self._client
        if client is None or not client.is_connected():
            return
        rc, mid = client.subscribe(topic_filter, qos)
        if rc == mqtt.MQTT_ERR_NO_CONN:
            return
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"cannot subscribe to {topic_filter!r}: {mqtt.error_string(rc)}")
        self._acks.await_suback(mid, self._config.publish_timeout)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        """Next inbound message; ``None`` after ``timeout`` or at once if closed and drained."""
        return self._inbox.get(timeout)

    def close(self) -> None:
        """Send DISCONNECT (so the broker discards the will) and stop the network thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._inbox.close()

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client | None:
        """A fresh paho client for the current protocol; ``None`` if one is already running."""
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._config.client_id!r} is closed")
            if self._client is not None:
                return None
            self._client = self._make_client()
            return self._client

    def _make_client(self) -> mqtt.Client:
        cfg = self._config
        if self._v5:  # clean start and session expiry are sent by connect()
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=cfg.client_id,
                clean_session=cfg.clean_session,
                protocol=mqtt.MQTTv311,
            )
        client.on_log = mqtt_config.forward_paho_log
        client.connect_timeout = cfg.connect_timeout
        if cfg.will is not None:
            client.will_set(cfg.will.topic, cfg.will.payload, qos=cfg.will.qos, retain=cfg.will.retain)
        if self._secrets.context is not None:
            client.tls_set_context(self._secrets.context)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, self._secrets.password)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _probe_v5(self, deadline: float) -> bool:
        """Whether the broker speaks MQTT 5, asked with a bare CONNECT: no will, no credentials,
        empty client id (so no session of ours is touched), clean start; DISCONNECT right after.

        Any CONNACK but "Unsupported protocol version" proves MQTT 5, even a refusal (the real
        CONNECT will report that); a connection closed without CONNACK means 3.1.1.
        """
        cfg = self._config
        probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
        probe.on_log = mqtt_config.forward_paho_log
        probe.connect_timeout = cfg.connect_timeout
        if self._secrets.context is not None:
            probe.tls_set_context(self._secrets.context)
        codes: list[ReasonCode] = []
        probe.on_connect = lambda client, userdata, flags, code, properties: codes.append(code)
        try:
            probe.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
            while not codes and time.monotonic() < deadline:
                if probe.loop(timeout=min(0.1, max(0.0, deadline - time.monotonic()))) != mqtt.MQTT_ERR_SUCCESS:
                    break  # closed by the broker
        except (OSError, ValueError) as exc:
            raise TransportError(tls.describe_connect_error(cfg.host, cfg.port, cfg.url, exc)) from exc
        finally:
            probe.disconnect()
        refusal = self._secrets.tls_refusal(cfg.host, cfg.port)
        if refusal is not None and not codes:
            raise TransportError(refusal)
        if not codes and time.monotonic() >= deadline:
            raise TransportError(f"no CONNACK from {cfg.url} within {cfg.connect_timeout}s")
        return bool(codes) and codes[0].value != mqtt_config.UNSUPPORTED_PROTOCOL_VERSION

    def _connect(self, client: mqtt.Client, deadline: float) -> None:
        """Connect ``client`` and wait for a successful CONNACK, else clean up and raise."""
        cfg = self._config
        v5_args: dict[str, Any] = {}  # paho refuses these on 3.1.1, where clean_session went to Client()
        if self._v5:
            expiry = mqtt_config.session_expiry_interval(cfg.clean_session, cfg.session_expiry_s)
            properties = _properties(PacketTypes.CONNECT, SessionExpiryInterval=expiry)
            v5_args = {"clean_start": cfg.clean_session, "properties": properties}
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, **v5_args)
        except (OSError, ValueError) as exc:
            self._abort_start(client)
            raise TransportError(tls.describe_connect_error(cfg.host, cfg.port, cfg.url, exc)) from exc
        client.loop_start()
        if not self._connack.wait(max(0.0, deadline - time.monotonic())):
            self._abort_start(client)
            raise TransportError(f"no CONNACK from {cfg.url} within {cfg.connect_timeout}s")
        error = self._connect_error
        if error is not None:
            self._abort_start(client)
            raise TransportError(error)

    @property
    def _v5(self) -> bool:
        return self._protocol == mqtt_config.PROTOCOL_V5

    def _abort_start(self, client: mqtt.Client) -> None:
        """Undo a failed start so no network thread keeps retrying behind the caller's back."""
        client.disconnect()
        client.loop_stop()
        with self._lock:
            self._client = None
        self._connack.clear()
        self._connect_error = None

    def _require_client(self) -> mqtt.Client:
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._config.client_id!r} is closed")
            if self._client is None:
                raise TransportError(f"transport {self._config.client_id!r} is not started")
            return self._client

    def _schedule_reconnect(self, client: mqtt.Client) -> None:
        """Give paho the next jittered delay; paho's own doubling is bypassed (min == max).

        Called from on_disconnect / on_connect_fail, which paho runs right before it sleeps.
        """
        delay = self._backoff.next_delay()
        # paho annotates the delays as int but only does float arithmetic with them.
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # -- paho callbacks: run on the network thread, must stay short and never raise ----------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._connect_error = f"{self._config.url} refused the connection: {_describe(reason_code)}"
            self._connack.set()
            return
        self._backoff.reset()
        self._max_packet_size = getattr(properties, "MaximumPacketSize", None)  # MQTT 5 only
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        self._acks.forget_subacks()
        if subscriptions:
            _, mid = client.subscribe(subscriptions)
            self._resubscribe_mid = mid
        birth = self._config.birth
        if birth is not None:  # queued by paho, sent by this network thread: no blocking here
            client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        self._connack.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._closed:
            self._schedule_reconnect(client)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self._last_disconnect = _describe(reason_code)
        refusal = self._secrets.tls_refusal(self._config.host, self._config.port)
        if refusal is not None and self._protocol_in_use is None:  # start() awaits a CONNACK that won't come
            client.disconnect()  # and gives up: no reconnect attempt (paho would sleep before it)
            self._connect_error = refusal
            self._connack.set()
            return
        if not self._closed:
            _log.warning(
                "mqtt %s lost its connection (%s); reconnecting", self._config.client_id, _describe(reason_code)
            )
            self._schedule_reconnect(client)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            _log.warning("dropping a message whose topic is not valid UTF-8")
            return
        self._inbox.put(InboundMessage(topic, bytes(message.payload)))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        refused = [_describe(code) for code in reason_codes if code.is_failure]
        self._acks.suback(mid, refused)
        if refused and mid == self._resubscribe_mid and self._protocol_in_use is not None:  # nobody awaits it
            _log.warning("mqtt %s: broker refused resubscription: %s", self._config.client_id, ", ".join(refused))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, props: Any) -> None:
        """Record the PUBACK for ``publish``, which reads it after this returns (paho marks a message
        published only then)."""
        self._acks.puback(mid, _describe(reason_code) if reason_code.is_failure else None)


def _properties(packet_type: int, **values: int | None) -> Properties | None:
    """MQTT 5 properties holding the non-zero ``values``; ``None`` if there are none."""
    properties = Properties(packet_type)
    for name, value in values.items():
        if value:
            setattr(properties, name, value)
    return None if properties.isEmpty() else properties


def _describe(reason_code: ReasonCode) -> str:
    return mqtt_config.describe_reason(reason_code.getName(), reason_code.value)
