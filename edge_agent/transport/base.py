"""The one narrow transport port between fedflock and a message broker.

Agents and the server talk only to :class:`Transport`. ``mqtt.py`` implements it over a real
MQTT broker with paho (the only module that imports paho), speaking MQTT 5 when the broker
offers it and MQTT 3.1.1 otherwise; ``memory.py`` implements it in process for unit tests and
simulations. Inbound messages are queued by the transport and pulled with
:meth:`Transport.receive`, so no user code ever runs on a network thread.
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

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        """Publish; for qos >= 1 block until the broker acknowledged it (or raise).

        ``expiry_s`` (> 0) asks the broker to discard the message if it could not be delivered
        within that many seconds (queued for an offline subscriber, or retained). Best effort:
        only MQTT 5 carries it (rounded up to whole seconds); an MQTT 3.1.1 connection and the
        in-memory hub ignore it, so it must never be the only guard against stale messages.
        """

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; subscriptions survive reconnects."""

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        """Next inbound message, or ``None`` after ``timeout`` seconds."""

    def close(self) -> None:
        """Disconnect cleanly (no will is published). Idempotent."""
