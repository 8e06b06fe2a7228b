"""Configuration and pure helpers of the MQTT transport, kept free of paho.

``mqtt.py`` is the transport and the only module in fedflock that imports paho; this module
holds what it needs to decide and compute, not to talk, so it can be read and tested alone
(``mqtt.py`` re-exports :class:`MqttConfig`, :class:`TlsConfig`, :func:`parse_broker_url`,
:func:`parse_mqtt_url` and :func:`reconnect_delay`):

* :class:`MqttConfig` and its validation, :func:`parse_broker_url` (``mqtt://`` and ``mqtts://``)
  and :func:`parse_mqtt_url` (plain ``mqtt://`` only), and :func:`forward_paho_log` (paho's log
  callback; it needs no paho import); the reconnect backoff (:func:`reconnect_delay`,
  :class:`Backoff`, full jitter and the ``[mqtt]`` reconnect keys) lives in ``backoff.py``;
* TLS settings and credential files live in ``tls.py`` (:class:`~edge_agent.transport.tls.TlsConfig`);
* the protocol setting (``"auto"``, ``"5"``, ``"3.1.1"``) and the CONNACK reason code by which
  ``"auto"`` recognises a broker that refuses MQTT 5 (the embedded amqtt broker speaks 3.1.1
  only and answers a bare MQTT 5 CONNECT with a 3.1.1 CONNACK "unacceptable protocol version");
* the Message Expiry and Session Expiry Interval values sent as MQTT 5 properties;
* the size of a PUBLISH packet, checked against the broker's Maximum Packet Size before sending,
  because paho does not check it and a broker disconnects a client that exceeds it;
* :class:`Acks`: SUBACK and PUBACK outcomes handed from paho's network thread to the callers
  waiting for them.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from edge_agent.errors import ConfigError, TransportError
from edge_agent.transport.backoff import JITTER_FULL, Backoff, reconnect_delay, validate_reconnect
from edge_agent.transport.base import Will
from edge_agent.transport.memory import validate_expiry
from edge_agent.transport.tls import TlsConfig

__all__ = [
    "MAX_FOUR_BYTE_INTEGER",
    "PROTOCOLS",
    "PROTOCOL_AUTO",
    "PROTOCOL_V5",
    "PROTOCOL_V311",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "Acks",
    "Backoff",
    "BrokerAddress",
    "MqttConfig",
    "check_packet_size",
    "describe_reason",
    "forward_paho_log",
    "message_expiry_interval",
    "parse_broker_url",
    "parse_mqtt_url",
    "publish_packet_size",
    "reconnect_delay",
    "session_expiry_interval",
    "validate_protocol",
    "validate_session_expiry",
]

_DEFAULT_PORT = 1883
_DEFAULT_TLS_PORT = 8883
_SCHEMES = {"mqtt": False, "mqtts": True}  # scheme -> TLS
_paho_log = logging.getLogger("edge_agent.transport.mqtt.paho")  # the name it had when mqtt.py logged it

PROTOCOL_AUTO = "auto"
PROTOCOL_V5 = "5"
PROTOCOL_V311 = "3.1.1"
PROTOCOLS = (PROTOCOL_AUTO, PROTOCOL_V5, PROTOCOL_V311)

MAX_FOUR_BYTE_INTEGER = 0xFFFFFFFF
"""Largest expiry interval; as a Session Expiry Interval it means "the session never expires"."""

UNSUPPORTED_PROTOCOL_VERSION = 0x84
"""CONNACK reason code "Unsupported protocol version". paho reports a 3.1.1-style CONNACK with
return code 1 ("unacceptable protocol version"), which a 3.1.1-only broker sends to an MQTT 5
client, as this reason code."""


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
    """``reconnect_jitter_mode="added"``: each delay is stretched by a random fraction in ``[0, reconnect_jitter]``."""
    reconnect_jitter_mode: str = JITTER_FULL
    """``"full"`` (uniform over the doubling window), ``"added"`` or ``"none"`` (``backoff.py``)."""
    clean_session: bool = True
    """``False`` asks the broker to keep subscriptions and queued QoS >= 1 messages while offline."""
    session_expiry_s: int | None = None
    """MQTT 5, ``clean_session=False`` only: how long the broker keeps the session after we go
    offline (``None``: forever). On MQTT 3.1.1 the broker's own policy decides."""
    protocol: str = PROTOCOL_AUTO
    """``"auto"`` (MQTT 5, falling back to 3.1.1), ``"5"`` or ``"3.1.1"``."""
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    """Read by ``MqttTransport.start()`` instead of ``password`` (not both), so config files hold no
    secret: the file's content minus its trailing newline. A world-readable file is logged as a warning."""
    tls: TlsConfig | None = None
    """``None``: plain TCP. :meth:`from_url` sets it for ``mqtts://`` URLs."""

    @classmethod
    def from_url(cls, url: str, *, tls: TlsConfig | None = None, **fields: Any) -> MqttConfig:
        """A config for the broker at ``mqtt://host[:port]`` or ``mqtts://host[:port]``.

        ``mqtts://`` without ``tls`` verifies the broker against the system CA store; ``mqtt://``
        with ``tls`` is a :class:`ConfigError` (plain or TLS? the two disagree).
        """
        address = parse_broker_url(url)
        if tls is not None and not address.tls:
            raise ConfigError(f"mqtt url {url!r} is plain mqtt:// but a tls config was given: use mqtts://")
        if address.tls and tls is None:
            tls = TlsConfig()
        return cls(host=address.host, port=address.port, tls=tls, **fields)

    @property
    def url(self) -> str:
        """``mqtts://host:port`` or ``mqtt://host:port``, for messages."""
        return BrokerAddress(self.host, self.port, self.tls is not None).url

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt host must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port {self.port} is out of range")
        if not self.client_id:
            raise ConfigError("mqtt client_id must not be empty")
        if self.keepalive < 0 or self.connect_timeout <= 0 or self.publish_timeout <= 0:
            raise ConfigError("keepalive must be >= 0 and timeouts > 0")
        validate_reconnect(
            self.reconnect_min_delay, self.reconnect_max_delay, self.reconnect_jitter, self.reconnect_jitter_mode
        )
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ConfigError("an mqtt password needs a username")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("give the mqtt password or its password_file, not both")
        if self.password_file is not None and not isinstance(self.password_file, Path):
            raise ConfigError(f"mqtt password_file must be a pathlib.Path, not {self.password_file!r}")
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise ConfigError(f"mqtt tls must be a TlsConfig or None, not {self.tls!r}")
        validate_protocol(self.protocol)
        validate_session_expiry(self.session_expiry_s, clean_session=self.clean_session)


class BrokerAddress(NamedTuple):
    """Where a broker listens and whether it speaks TLS there (``mqtts://``)."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Split ``mqtt://host[:port]`` (port 1883) or ``mqtts://host[:port]`` (8883, TLS) into a :class:`BrokerAddress`.

    Anything else is a :class:`ConfigError`. Credentials are deliberately not accepted here: they
    belong in :class:`MqttConfig`, not in a URL that ends up in logs.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid mqtt url {url!r}: {exc}") from exc
    if parts.scheme not in _SCHEMES:
        raise ConfigError(f"invalid mqtt url {url!r}: scheme must be 'mqtt' or 'mqtts'")
    if not parts.hostname:
        raise ConfigError(f"invalid mqtt url {url!r}: missing host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"invalid mqtt url {url!r}: put credentials in the config, not the url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid mqtt url {url!r}: unexpected path, query or fragment")
    if port == 0:
        raise ConfigError(f"invalid mqtt url {url!r}: port 0")
    tls = _SCHEMES[parts.scheme]
    if port is None:
        port = _DEFAULT_TLS_PORT if tls else _DEFAULT_PORT
    return BrokerAddress(parts.hostname, port, tls)


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Split a plain ``mqtt://host[:port]`` into ``(host, port)``; anything else is a :class:`ConfigError`.

    ``mqtts://`` is refused: a ``(host, port)`` pair cannot say "TLS", and a caller that dropped it
    would send its credentials in clear text. Use :func:`parse_broker_url` or
    :meth:`MqttConfig.from_url` for URLs that may be either.
    """
    address = parse_broker_url(url)
    if address.tls:
        raise ConfigError(f"{url!r} is an mqtts:// url: use parse_broker_url() or MqttConfig.from_url() to keep TLS")
    return address.host, address.port


class Acks:
    """SUBACK and PUBACK outcomes, recorded on paho's network thread and awaited by callers.

    Reason codes arrive already described (:func:`describe_reason`), so this needs no paho types.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._subacks: dict[int, list[str]] = {}  # mid -> refused reason codes (empty: all granted)
        self._publish_failures: dict[int, str] = {}  # mid -> failure reason code of its PUBACK

    def suback(self, mid: int, refused: list[str]) -> None:
        with self._cond:
            self._subacks[mid] = refused
            self._cond.notify_all()

    def forget_subacks(self) -> None:
        """On a new connection: acks of the previous one can no longer arrive."""
        with self._cond:
            self._subacks.clear()

    def await_suback(self, mid: int, timeout: float) -> None:
        """Wait for the SUBACK of ``mid``; :class:`TransportError` on timeout or if it refused a filter."""
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TransportError(f"no SUBACK within {timeout:.1f}s")
            refused = self._subacks.pop(mid)
        if refused:
            raise TransportError(f"broker refused subscription: {', '.join(refused)}")

    def puback(self, mid: int, failure: str | None) -> None:
        """Record a PUBACK's failure reason; a success clears a stale entry of a reused mid."""
        with self._cond:
            if failure is not None:
                self._publish_failures[mid] = failure
            else:
                self._publish_failures.pop(mid, None)

    def publish_failure(self, mid: int) -> str | None:
        """The failure reason of ``mid``'s PUBACK (read once, after paho marked it published)."""
        with self._cond:
            return self._publish_failures.pop(mid, None)


def validate_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"mqtt protocol must be one of {', '.join(map(repr, PROTOCOLS))}, not {protocol!r}")


def validate_session_expiry(session_expiry_s: int | None, *, clean_session: bool) -> None:
    if session_expiry_s is None:
        return
    if clean_session:
        raise ConfigError("session_expiry_s needs clean_session=False (a clean session is never kept)")
    if isinstance(session_expiry_s, bool) or not isinstance(session_expiry_s, int):
        raise ConfigError(f"session_expiry_s must be an int, not {session_expiry_s!r}")
    if not 1 <= session_expiry_s <= MAX_FOUR_BYTE_INTEGER:
        raise ConfigError(f"session_expiry_s must be between 1 and {MAX_FOUR_BYTE_INTEGER}, not {session_expiry_s}")


def session_expiry_interval(clean_session: bool, session_expiry_s: int | None) -> int:
    """The CONNECT Session Expiry Interval: 0 (end with the connection) for a clean session,
    otherwise ``session_expiry_s`` or, if that is ``None``, "never expires"."""
    if clean_session:
        return 0
    return MAX_FOUR_BYTE_INTEGER if session_expiry_s is None else session_expiry_s


def message_expiry_interval(expiry_s: float | None) -> int | None:
    """The PUBLISH Message Expiry Interval for ``expiry_s``: whole seconds rounded up, at least 1."""
    validate_expiry(expiry_s)
    if expiry_s is None:
        return None
    return min(MAX_FOUR_BYTE_INTEGER, max(1, math.ceil(expiry_s)))


def check_packet_size(topic: str, payload_size: int, *, qos: int, properties_size: int, limit: int | None) -> None:
    """Raise :class:`TransportError` if the PUBLISH packet would exceed the broker's Maximum Packet Size ``limit``."""
    if limit is None:
        return
    size = publish_packet_size(topic, payload_size, qos=qos, properties_size=properties_size)
    if size > limit:
        raise TransportError(
            f"cannot publish {payload_size} bytes to {topic!r}: the PUBLISH packet would be {size} bytes, "
            f"over the broker's Maximum Packet Size of {limit} bytes"
        )


def publish_packet_size(topic: str, payload_size: int, *, qos: int, properties_size: int) -> int:
    """Bytes on the wire of a PUBLISH packet (fixed header included), as Maximum Packet Size counts them.

    ``properties_size`` is the encoded property block including its own length prefix (always 0
    for MQTT 3.1.1, at least 1 for MQTT 5).
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + properties_size + payload_size
    return 1 + _varint_size(remaining) + remaining


def describe_reason(name: str, value: int) -> str:
    """``"Not authorized (0x87)"``: the reason code's name first, so messages are greppable by it."""
    return f"{name} (0x{value:02X})"


def forward_paho_log(client: Any, userdata: Any, level: int, message: str) -> None:
    """paho's ``on_log``: forward at DEBUG to ``edge_agent.transport.mqtt.paho``, except exceptions
    escaping our callbacks (ERROR).

    paho reports routine conditions at ERROR ("Client is not connected" after every clean close
    and every failed reconnect attempt); real failures reach callers as TransportError instead.
    """
    severity = logging.ERROR if message.startswith("Caught exception") else logging.DEBUG
    if _paho_log.isEnabledFor(severity):
        _paho_log.log(severity, "%s", message)


def _varint_size(value: int) -> int:
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size
