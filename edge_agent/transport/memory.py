"""In-process :class:`~edge_agent.transport.base.Transport` for unit tests and fleet simulations.

:class:`InMemoryBroker` is a hub with the MQTT 3.1.1 semantics fedflock relies on: ``+``/``#``
topic filters (``$``-topics hidden from leading wildcards), retained messages replayed on
subscribe and cleared by an empty retained payload, and a will published when a client vanishes
(:meth:`InMemoryTransport.kill`) but not on a clean :meth:`InMemoryTransport.close`. Delivery is
synchronous and lossless, so every QoS behaves like "exactly once"; tests that need loss,
duplicates or reconnects must run against a real broker (see ``tests/edge_agent``).

The topic helpers and :class:`Inbox` here are pure and shared with ``mqtt.py`` so both backends
validate topics and hand over messages identically.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from types import TracebackType

from edge_agent.errors import TransportError
from edge_agent.transport.base import InboundMessage, Will

__all__ = [
    "InMemoryBroker",
    "InMemoryTransport",
    "Inbox",
    "topic_matches",
    "validate_expiry",
    "validate_qos",
    "validate_topic",
    "validate_topic_filter",
]

_MAX_TOPIC_BYTES = 65535  # MQTT strings carry a 16-bit length prefix


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` under MQTT 3.1.1 rules (section 4.7).

    ``+`` matches exactly one (possibly empty) level, a trailing ``#`` matches the parent level
    and everything below it, and topics starting with ``$`` are never matched by a filter whose
    first level is a wildcard. The filter is assumed valid (see :func:`validate_topic_filter`);
    a misplaced ``#`` is compared literally and so never matches a valid topic.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    last = len(filter_levels) - 1
    for index, level in enumerate(filter_levels):
        if level == "#" and index == last:
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def validate_topic(topic: str) -> None:
    """Reject topic names a broker would refuse (after which it drops the connection)."""
    _validate_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise TransportError(f"topic {topic!r} must not contain wildcards")


def validate_topic_filter(topic_filter: str) -> None:
    """Reject filters with a ``#`` that is not the whole last level or a ``+`` that is not a whole level."""
    _validate_common(topic_filter, "topic filter")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise TransportError(f"topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise TransportError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def validate_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise TransportError(f"qos must be 0, 1 or 2, not {qos!r}")


def validate_expiry(expiry_s: float | None) -> None:
    """``expiry_s`` of a publish: ``None`` (never expires) or a finite number of seconds > 0."""
    if expiry_s is None:
        return
    if isinstance(expiry_s, bool) or not isinstance(expiry_s, (int, float)):
        raise TransportError(f"expiry_s must be a number of seconds, not {expiry_s!r}")
    if not (math.isfinite(expiry_s) and expiry_s > 0):
        raise TransportError(f"expiry_s must be finite and > 0, not {expiry_s!r}")


def _validate_common(name: str, what: str) -> None:
    if not name:
        raise TransportError(f"{what} must not be empty")
    if "\x00" in name:
        raise TransportError(f"{what} {name!r} must not contain NUL")
    if len(name.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise TransportError(f"{what} is longer than {_MAX_TOPIC_BYTES} bytes")


class Inbox:
    """Thread-safe FIFO of inbound messages whose :meth:`close` wakes every blocked reader.

    Without the wake-up a ``receive(timeout=None)`` racing a ``close()`` would block forever.
    Messages queued before the close are still returned; after that, reads return ``None``.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[InboundMessage | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()

    def put(self, message: InboundMessage) -> None:
        self._queue.put(message)

    def get(self, timeout: float | None = None) -> InboundMessage | None:
        try:
            item = self._queue.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            return None
        if item is None:
            self._queue.put(None)  # leave the closed marker for the next reader
        return item

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)


@dataclass(eq=False)
class _Session:
    client_id: str
    inbox: Inbox
    will: Will | None
    filters: set[str] = field(default_factory=set)
    connected: bool = True


class InMemoryBroker:
    """Thread-safe in-process MQTT-like hub shared by any number of :class:`InMemoryTransport`.

    One lock serialises all operations, so a subscribe and a publish are atomic with respect to
    each other and each subscriber sees one publisher's messages in publish order. A client
    subscribed with several overlapping filters receives a message once (real brokers may
    deliver one copy per matching subscription; do not rely on either).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}
        self._closed = False

    def retained(self) -> dict[str, bytes]:
        """Snapshot of the retained messages (topic -> payload), for assertions in tests."""
        with self._lock:
            return dict(self._retained)

    def connected_clients(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def close(self) -> None:
        """Simulate a broker that is down: connected clients lose their session, new ones are refused."""
        with self._lock:
            self._closed = True
            for session in self._sessions.values():
                session.connected = False
            self._sessions.clear()

    def _connect(self, client_id: str, inbox: Inbox, will: Will | None, filters: set[str]) -> _Session:
        """Attach a client; like MQTT, a second client with the same id takes the session over."""
        with self._lock:
            if self._closed:
                raise TransportError("in-memory broker is closed")
            previous = self._sessions.pop(client_id, None)
            if previous is not None:
                previous.connected = False
            session = _Session(client_id, inbox, will)
            self._sessions[client_id] = session
            for topic_filter in sorted(filters):
                self._subscribe(session, topic_filter)
            return session

    def _disconnect(self, session: _Session, *, publish_will: bool) -> None:
        with self._lock:
            if not session.connected:
                return
            session.connected = False
            if self._sessions.get(session.client_id) is session:
                del self._sessions[session.client_id]
            if publish_will and session.will is not None:
                will = session.will
                self._publish(will.topic, will.payload, retain=will.retain)

    def _subscribe(self, session: _Session, topic_filter: str) -> None:
        with self._lock:
            self._require_connected(session)
            session.filters.add(topic_filter)
            for topic, payload in self._retained.items():
                if topic_matches(topic_filter, topic):
                    session.inbox.put(InboundMessage(topic, payload))

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)  # [MQTT-3.3.1-10]; still delivered live below
            message = InboundMessage(topic, payload)
            for session in self._sessions.values():
                if any(topic_matches(f, topic) for f in session.filters):
                    session.inbox.put(message)

    def _publish_from(self, session: _Session, topic: str, payload: bytes, *, retain: bool) -> None:
        with self._lock:
            self._require_connected(session)
            self._publish(topic, payload, retain=retain)

    def _require_connected(self, session: _Session) -> None:
        if not session.connected:
            raise TransportError(f"client {session.client_id!r} is not connected to the in-memory broker")


class InMemoryTransport:
    """A :class:`~edge_agent.transport.base.Transport` attached to an :class:`InMemoryBroker`.

    Subscriptions made before :meth:`start` are applied when it connects (as ``mqtt.py`` does).
    The transport is single-use: after :meth:`close` or :meth:`kill` it cannot be restarted.
    """

    def __init__(self, broker: InMemoryBroker, client_id: str, *, will: Will | None = None) -> None:
        if not client_id:
            raise TransportError("client_id must not be empty")
        self._broker = broker
        self._client_id = client_id
        self._will = will
        self._inbox = Inbox()
        self._filters: set[str] = set()
        self._session: _Session | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def client_id(self) -> str:
        return self._client_id

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._client_id!r} is closed")
            if self._session is None or not self._session.connected:
                self._session = self._broker._connect(self._client_id, self._inbox, self._will, self._filters)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        """Deliver at once to every matching subscriber.

        ``expiry_s`` is validated like the MQTT backend does, then ignored: delivery here is
        synchronous, so nothing waits in a queue long enough to expire, and retained messages
        are kept until cleared (like a broker on MQTT 3.1.1).
        """
        validate_topic(topic)
        validate_qos(qos)
        validate_expiry(expiry_s)
        self._broker._publish_from(self._require_session(), topic, bytes(payload), retain=retain)

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        validate_topic_filter(topic_filter)
        validate_qos(qos)
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._client_id!r} is closed")
            self._filters.add(topic_filter)
            session = self._session
        if session is not None:
            self._broker._subscribe(session, topic_filter)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        return self._inbox.get(timeout)

    def close(self) -> None:
        """Disconnect cleanly: the broker discards the will."""
        self._shutdown(publish_will=False)

    def kill(self) -> None:
        """Simulate an abrupt disconnect (crash, lost network): the broker publishes the will."""
        self._shutdown(publish_will=True)

    def __enter__(self) -> InMemoryTransport:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _shutdown(self, *, publish_will: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session = self._session
        if session is not None:
            self._broker._disconnect(session, publish_will=publish_will)
        self._inbox.close()

    def _require_session(self) -> _Session:
        with self._lock:
            if self._closed:
                raise TransportError(f"transport {self._client_id!r} is closed")
            if self._session is None:
                raise TransportError(f"transport {self._client_id!r} is not started")
            return self._session
