"""The one narrow transport port between fedflock and a message broker.

Agents and the server talk only to :class:`Transport`. ``mqtt.py`` implements it over a real
MQTT broker with paho (the only module that imports paho); ``memory.py`` implements it in
process for unit tests and simulations. Inbound messages are queued by the transport and
pulled with :meth:`Transport.receive`, so no user code ever runs on a network thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class Will:
    """Published by the broker on our behalf if we vanish without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(Protocol):
    def start(self) -> None:
        """Connect (blocking until connected or raising :class:`TransportError`)."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; for qos >= 1 block until the broker acknowledged it (or raise)."""

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; subscriptions survive reconnects."""

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        """Next inbound message, or ``None`` after ``timeout`` seconds."""

    def close(self) -> None:
        """Disconnect cleanly (no will is published). Idempotent."""
