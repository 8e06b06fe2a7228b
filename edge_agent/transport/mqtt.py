"""MQTT 3.1.1 :class:`~edge_agent.transport.base.Transport` over paho-mqtt.

This is the only module in fedflock that imports paho. paho's network thread (``loop_start``)
does all socket I/O; its callbacks only copy data into queues and flags, never run user code.

Choices worth knowing:

* The protocol is pinned to MQTT 3.1.1 because the embedded amqtt broker refuses MQTT 5.
* paho's reconnect backoff doubles with no jitter, so after a broker restart a whole fleet would
  reconnect in lockstep. Before every reconnect attempt we compute our own jittered exponential
  delay (:func:`reconnect_delay`) and hand it to paho through ``reconnect_delay_set``.
* ``MQTTMessageInfo.wait_for_publish`` returns silently on timeout, so QoS >= 1 publishes check
  ``is_published()`` afterwards and raise :class:`TransportError`.
* paho keeps session state in memory only: a QoS 1 message whose publish raised may still be
  delivered after a reconnect, so receivers must tolerate duplicates.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport.base import InboundMessage, Will
from edge_agent.transport.memory import Inbox, validate_qos, validate_topic, validate_topic_filter

__all__ = ["MqttConfig", "MqttTransport", "parse_mqtt_url", "reconnect_delay"]

_log = logging.getLogger(__name__)
_paho_log = _log.getChild("paho")
_DEFAULT_PORT = 1883


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """Everything needed to reach one broker; validated on construction."""

    host: str
    port: int = _DEFAULT_PORT
    client_id: str
    keepalive: int = 30
    connect_timeout: float = 10.0
    publish_timeout: float = 30.0
    will: Will | None = None
    birth: Will | None = None
    """Published on every (re)connect: the counterpart of the will. A device's retained "online"
    status must come back after the broker published its "offline" will during an outage."""
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    reconnect_jitter: float = 1.0
    """Each reconnect delay is stretched by a random fraction in ``[0, reconnect_jitter]``."""
    clean_session: bool = True
    """``False`` asks the broker to keep subscriptions and queued QoS >= 1 messages while offline."""
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt host must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port {self.port} is out of range")
        if not self.client_id:
            raise ConfigError("mqtt client_id must not be empty")
        if self.keepalive < 0 or self.connect_timeout <= 0 or self.publish_timeout <= 0:
            raise ConfigError("keepalive must be >= 0 and timeouts > 0")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay or self.reconnect_jitter < 0:
            raise ConfigError("need 0 < reconnect_min_delay <= reconnect_max_delay and reconnect_jitter >= 0")
        if self.password is not None and self.username is None:
            raise ConfigError("an mqtt password needs a username")


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host[:port]`` into ``(host, port)``; anything else is a :class:`ConfigError`.

    Credentials and TLS are deliberately not accepted here: they belong in :class:`MqttConfig`,
    not in a URL that ends up in logs.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid mqtt url {url!r}: {exc}") from exc
    if parts.scheme != "mqtt":
        raise ConfigError(f"invalid mqtt url {url!r}: scheme must be 'mqtt'")
    if not parts.hostname:
        raise ConfigError(f"invalid mqtt url {url!r}: missing host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"invalid mqtt url {url!r}: put credentials in the config, not the url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid mqtt url {url!r}: unexpected path, query or fragment")
    if port == 0:
        raise ConfigError(f"invalid mqtt url {url!r}: port 0")
    return parts.hostname, _DEFAULT_PORT if port is None else port


def reconnect_delay(attempt: int, *, min_delay: float, max_delay: float, jitter: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): capped doubling plus random jitter.

    The jitter is added on top of the cap so that devices which all hit ``max_delay`` still
    spread out instead of hammering a recovering broker at the same instant.
    """
    base = min(max_delay, min_delay * 2.0 ** min(attempt, 62))
    return base + rng.uniform(0.0, jitter * base)


class MqttTransport:
    """:class:`~edge_agent.transport.base.Transport` over a real MQTT 3.1.1 broker.

    No I/O happens before :meth:`start`. Subscriptions are recorded and re-sent on every
    (re)connect, so they survive broker restarts even with clean sessions. Single-use: once
    closed it cannot be restarted; build a new one.
    """

    def __init__(self, config: MqttConfig, *, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._inbox = Inbox()
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._acks = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._connack = threading.Event()
        self._connect_error: str | None = None
        self._resubscribe_mid: int | None = None
        self._attempt = 0
        self._closed = False

    @property
    def config(self) -> MqttConfig:
        return self._config

    def is_connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def start(self) -> None:
        cfg = self._config
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {cfg.client_id!r} is closed")
            if self._client is not None:
                return
            client = self._make_client()
            self._client = client
        deadline = time.monotonic() + cfg.connect_timeout
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
        except (OSError, ValueError) as exc:
            self._abort_start(client)
            raise TransportError(f"cannot connect to mqtt://{cfg.host}:{cfg.port}: {exc}") from exc
        client.loop_start()
        if not self._connack.wait(max(0.0, deadline - time.monotonic())):
            self._abort_start(client)
            raise TransportError(f"no CONNACK from mqtt://{cfg.host}:{cfg.port} within {cfg.connect_timeout}s")
        if self._connect_error is not None:
            self._abort_start(client)
            raise TransportError(f"mqtt://{cfg.host}:{cfg.port} refused the connection: {self._connect_error}")
        mid = self._resubscribe_mid
        if mid is not None:
            self._await_suback(mid, max(0.0, deadline - time.monotonic()))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        validate_topic(topic)
        validate_qos(qos)
        client = self._require_client()
        try:
            info = client.publish(topic, bytes(payload), qos=qos, retain=retain)
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
            raise TransportError(f"publish to {topic!r} not acknowledged within {self._config.publish_timeout}s")

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Record the subscription and, if connected, wait for the broker's SUBACK.

        While disconnected the subscription is only recorded; it is sent on the next connect.
        """
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
        self._await_suback(mid, self._config.publish_timeout)

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

    def _make_client(self) -> mqtt.Client:
        cfg = self._config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=cfg.clean_session,
            protocol=mqtt.MQTTv311,
        )
        client.on_log = _on_paho_log
        client.connect_timeout = cfg.connect_timeout
        if cfg.will is not None:
            client.will_set(cfg.will.topic, cfg.will.payload, qos=cfg.will.qos, retain=cfg.will.retain)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

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

    def _await_suback(self, mid: int, timeout: float) -> None:
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._subacks, timeout):
                raise TransportError(f"no SUBACK within {timeout:.1f}s")
            codes = self._subacks.pop(mid)
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            raise TransportError(f"broker refused subscription: {', '.join(refused)}")

    def _schedule_reconnect(self, client: mqtt.Client) -> None:
        """Give paho the next jittered delay; paho's own doubling is bypassed (min == max).

        Called from on_disconnect / on_connect_fail, which paho runs right before it sleeps.
        """
        cfg = self._config
        delay = reconnect_delay(
            self._attempt,
            min_delay=cfg.reconnect_min_delay,
            max_delay=cfg.reconnect_max_delay,
            jitter=cfg.reconnect_jitter,
            rng=self._rng,
        )
        self._attempt += 1
        # paho annotates the delays as int but only does float arithmetic with them.
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    # -- paho callbacks: run on the network thread, must stay short and never raise ----------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            self._connack.set()
            return
        self._attempt = 0
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        with self._acks:
            self._subacks.clear()  # acks of the previous connection can no longer arrive
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
        if not self._closed:
            _log.warning("mqtt %s lost its connection (%s); reconnecting", self._config.client_id, reason_code)
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
        with self._acks:
            self._subacks[mid] = list(reason_codes)
            self._acks.notify_all()


def _on_paho_log(client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
    """Forward paho's log at DEBUG, except exceptions escaping our callbacks.

    paho reports routine conditions at ERROR ("Client is not connected" after every clean close
    and every failed reconnect attempt); real failures reach callers as TransportError instead.
    """
    severity = logging.ERROR if message.startswith("Caught exception") else logging.DEBUG
    if _paho_log.isEnabledFor(severity):
        _paho_log.log(severity, "%s", message)
