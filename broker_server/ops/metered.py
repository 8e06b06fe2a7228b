"""A :class:`~edge_agent.transport.base.Transport` that counts payload bytes in and out.

Wrapping the server's transport is the one place that sees every byte (STATUS, FETCH, chunked
uploads, TASKs, model chunks) exactly once, without the dispatcher or round engine knowing::

    server = FederatedServer(MeteredTransport(transport, metrics), bundle, config)

Only payload bytes are counted (not topics, MQTT headers or TLS), and a publish is counted once
it returned, i.e. once the broker acknowledged it (qos >= 1).
"""

from __future__ import annotations

from typing import Protocol

from edge_agent.transport.base import InboundMessage, Transport

__all__ = ["ByteCounter", "MeteredTransport"]


class ByteCounter(Protocol):
    """What :class:`MeteredTransport` reports to (:class:`~broker_server.ops.metrics.ServerMetrics`)."""

    def bytes_received(self, nbytes: int) -> None: ...
    def bytes_sent(self, nbytes: int) -> None: ...


class MeteredTransport:
    def __init__(self, inner: Transport, metrics: ByteCounter) -> None:
        self.inner = inner
        self._metrics = metrics

    def start(self) -> None:
        self.inner.start()

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: float | None = None
    ) -> None:
        self.inner.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)
        self._metrics.bytes_sent(len(payload))

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        message = self.inner.receive(timeout=timeout)
        if message is not None:
            self._metrics.bytes_received(len(message.payload))
        return message

    def close(self) -> None:
        self.inner.close()
