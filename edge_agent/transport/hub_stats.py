"""What a :class:`~edge_agent.transport.hub.ClientHub` drives and counts (no paho, no I/O)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["EVENT_LOG_SIZE", "HubClient", "HubCounters", "HubStats"]

#: how many connect / attempt / loss timestamps a hub keeps (the reconnect-storm drill reads them)
EVENT_LOG_SIZE = 200_000


class HubClient(Protocol):
    """The part of ``paho.mqtt.client.Client`` the hub drives (paho's external-loop API)."""

    def socket(self) -> Any: ...
    def loop_read(self) -> int: ...
    def loop_write(self) -> int: ...
    def loop_misc(self) -> int: ...
    def want_write(self) -> bool: ...
    def reconnect(self) -> int: ...
    def disconnect(self) -> int: ...


@dataclass(frozen=True)
class HubStats:
    """Counters of one hub since it was created (bytes are MQTT payload bytes)."""

    clients: int
    connected: int
    connects: int
    attempts: int
    failed_attempts: int
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int


class HubCounters:
    """Thread-safe counters and a bounded log of ``(wall time, kind)`` connection events, where
    kind is ``"attempt"`` (a TCP connect + CONNECT), ``"connect"`` (a successful CONNACK) or
    ``"lost"`` (a connection that ended without our DISCONNECT)."""

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._counts = {"connects": 0, "attempts": 0, "failed": 0, "in": 0, "out": 0, "msg_in": 0, "msg_out": 0}
        self.events: deque[tuple[float, str]] = deque(maxlen=EVENT_LOG_SIZE)

    def event(self, kind: str) -> None:
        """Record one connection event (``"attempt"``, ``"connect"``, ``"lost"``, ``"failed"``)."""
        key = {"attempt": "attempts", "connect": "connects", "failed": "failed"}.get(kind)
        with self._lock:
            if key is not None:
                self._counts[key] += 1
            if kind != "failed":
                self.events.append((self._wall_clock(), kind))

    def payload(self, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            self._counts["in"] += bytes_in
            self._counts["out"] += bytes_out
            self._counts["msg_in"] += bytes_in > 0
            self._counts["msg_out"] += bytes_out > 0

    def snapshot(self, *, clients: int, connected: int) -> HubStats:
        with self._lock:
            c = dict(self._counts)
        return HubStats(
            clients=clients,
            connected=connected,
            connects=c["connects"],
            attempts=c["attempts"],
            failed_attempts=c["failed"],
            bytes_in=c["in"],
            bytes_out=c["out"],
            messages_in=c["msg_in"],
            messages_out=c["msg_out"],
        )

    def events_since(self, since: float) -> list[tuple[float, str]]:
        with self._lock:
            return [e for e in self.events if e[0] >= since]
