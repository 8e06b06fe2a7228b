"""MQTT 5 / 3.1.1 :class:`~edge_agent.transport.base.Transport` over paho-mqtt.

paho itself is imported only by ``paho_client.py``; the configuration and paho-free helpers live
in ``mqtt_config.py`` and ``backoff.py``. paho's network thread (``loop_start``) does all socket
I/O, or, with ``hub=`` (:class:`~edge_agent.transport.hub.ClientHub`), one hub thread does it for
many transports (the fleet simulator); callbacks only copy data into queues and flags, never run
user code.

Choices worth knowing:

* ``protocol="auto"`` probes with a bare MQTT 5 CONNECT first (amqtt 0.12 never answers one
  with a will) and falls back to 3.1.1 for this transport and its reconnects.
* MQTT 5 only: message and session expiry, failure reason codes in CONNACK/SUBACK/PUBACK raised
  as :class:`TransportError` naming the code, and the broker's Maximum Packet Size enforced
  before sending (paho does not check it; the broker would disconnect us). On 3.1.1 expiries
  are ignored and a broker that refuses a publish still acknowledges it. paho 2.2 ignores PUBREC
  reason codes, so a refused QoS 2 publish looks successful even on MQTT 5.
* paho's reconnect backoff has no jitter (a fleet would reconnect in lockstep): each attempt
  gets our jittered exponential delay (``backoff.py``, full jitter by default) through
  ``reconnect_delay_set``, or from the hub's reconnect timer.
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
from collections.abc import Callable
from types import TracebackType
from typing import Any

from edge_agent.errors import TransportError
from edge_agent.transport import mqtt_config, tls
from edge_agent.transport import paho_client as mqtt
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.hub import ClientHub, HubLink
from edge_agent.transport.memory import Inbox, validate_qos, validate_topic, validate_topic_filter
from edge_agent.transport.mqtt_config import Backoff, MqttConfig, parse_broker_url, parse_mqtt_url, reconnect_delay
from edge_agent.transport.paho_client import PacketTypes, ReasonCode
from edge_agent.transport.tls import TlsConfig

__all__ = ["MqttConfig", "MqttTransport", "TlsConfig", "parse_broker_url", "parse_mqtt_url", "reconnect_delay"]

_log = logging.getLogger(__name__)


class MqttTransport:
    """:class:`~edge_agent.transport.base.Transport` over a real MQTT 5 or 3.1.1 broker.

    No I/O before :meth:`start`. Subscriptions are re-sent on every (re)connect, so they survive
    broker restarts even with clean sessions. Once closed it cannot be restarted.

    ``hub``: a started :class:`ClientHub` whose one thread does this transport's I/O and
    reconnects (instead of a paho thread per transport). ``on_inbound`` is called (on the
    network thread; it must be short) after each inbound message is queued.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        rng: random.Random | None = None,
        hub: ClientHub | None = None,
        on_inbound: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._hub = hub
        self._link: HubLink | None = None
        self._on_inbound = on_inbound
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
            v5 = mqtt.probe_v5(cfg, self._secrets, deadline)
            self._protocol = mqtt_config.PROTOCOL_V5 if v5 else mqtt_config.PROTOCOL_V311
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
        properties = mqtt.properties(PacketTypes.PUBLISH, MessageExpiryInterval=interval) if self._v5 else None
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
        if self._link is not None:
            self._link.count(bytes_out=len(data))

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
            self._stop_client(client)
        self._inbox.close()

    def drop_connection(self, *, hold_s: float) -> None:
        """Cut the connection without DISCONNECT (the broker publishes the will), as a crash or a
        dead network would, and reconnect no sooner than ``hold_s`` later. Hub transports only
        (fault drills and the fleet simulator's dropouts)."""
        link = self._link
        if self._hub is None or link is None:
            raise TransportError(f"transport {self._config.client_id!r}: drop_connection needs a hub transport")
        self._hub.sever(link, hold_s)

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
        secrets = self._secrets
        client = mqtt.new_client(self._config, v5=self._v5, context=secrets.context, password=secrets.password)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        if self._hub is not None:
            link = self._hub.attach(client, on_connect_failed=lambda: self._on_connect_fail(client, None))
            client.on_socket_open = link.socket_opened
            client.on_socket_close = link.socket_closed
            client.on_socket_register_write = link.register_write
            client.on_socket_unregister_write = link.unregister_write
            self._link = link
        return client

    def _connect(self, client: mqtt.Client, deadline: float) -> None:
        """Connect ``client`` and wait for a successful CONNACK, else clean up and raise."""
        cfg = self._config
        v5_args: dict[str, Any] = {}  # paho refuses these on 3.1.1, where clean_session went to Client()
        if self._v5:
            expiry = mqtt_config.session_expiry_interval(cfg.clean_session, cfg.session_expiry_s)
            properties = mqtt.properties(PacketTypes.CONNECT, SessionExpiryInterval=expiry)
            v5_args = {"clean_start": cfg.clean_session, "properties": properties}
        try:
            if self._hub is not None and self._link is not None:
                link = self._link
                self._hub.connect(link, lambda: client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, **v5_args))
            else:
                client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, **v5_args)
        except (OSError, ValueError) as exc:
            self._abort_start(client)
            raise TransportError(tls.describe_connect_error(cfg.host, cfg.port, cfg.url, exc)) from exc
        if self._hub is None:
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
        self._stop_client(client)
        with self._lock:
            self._client = None
        self._connack.clear()
        self._connect_error = None

    def _stop_client(self, client: mqtt.Client) -> None:
        """DISCONNECT and stop the network I/O: paho's thread, or the hub's service of this client."""
        link, self._link = self._link, None
        if self._hub is not None and link is not None:
            self._hub.release(link)
            return
        client.disconnect()
        client.loop_stop()

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
        if self._link is not None:
            self._link.reconnect_later(delay)
            return
        # paho annotates the delays as int but only does float arithmetic with them.
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # -- paho callbacks: run on the network thread, must stay short and never raise ----------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._connect_error = f"{self._config.url} refused the connection: {mqtt.describe(reason_code)}"
            self._connack.set()
            return
        self._backoff.reset()
        if self._link is not None:
            self._link.note_connected(True)
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
            self._last_disconnect = mqtt.describe(reason_code)
        refusal = self._secrets.tls_refusal(self._config.host, self._config.port)
        if refusal is not None and self._protocol_in_use is None:  # start() awaits a CONNACK that won't come
            client.disconnect()  # and gives up: no reconnect attempt (paho would sleep before it)
            self._connect_error = refusal
            self._connack.set()
            return
        if not self._closed:
            _log.warning(
                "mqtt %s lost its connection (%s); reconnecting", self._config.client_id, mqtt.describe(reason_code)
            )
            self._schedule_reconnect(client)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            _log.warning("dropping a message whose topic is not valid UTF-8")
            return
        payload = bytes(message.payload)
        self._inbox.put(InboundMessage(topic, payload))
        if self._link is not None:
            self._link.count(bytes_in=len(payload))
        if self._on_inbound is not None:
            self._on_inbound()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        refused = [mqtt.describe(code) for code in reason_codes if code.is_failure]
        self._acks.suback(mid, refused)
        if refused and mid == self._resubscribe_mid and self._protocol_in_use is not None:  # nobody awaits it
            _log.warning("mqtt %s: broker refused resubscription: %s", self._config.client_id, ", ".join(refused))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, props: Any) -> None:
        """Record the PUBACK for ``publish``, which reads it after this returns (paho marks a message
        published only then)."""
        self._acks.puback(mid, mqtt.describe(reason_code) if reason_code.is_failure else None)
