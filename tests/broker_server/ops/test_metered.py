"""MeteredTransport counts every payload byte in and out, once, and changes nothing else."""

from __future__ import annotations

from broker_server.ops.metered import MeteredTransport
from broker_server.ops.metrics import ServerMetrics
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from tests.broker_server.ops.test_prometheus import parse_exposition


def test_bytes_in_and_out_are_counted_and_messages_pass_through() -> None:
    broker = InMemoryBroker()
    metrics = ServerMetrics()
    server = MeteredTransport(InMemoryTransport(broker, "server"), metrics)
    device = InMemoryTransport(broker, "dev-1")
    server.start()
    device.start()
    try:
        server.subscribe("in/#")
        device.subscribe("out/#")
        device.publish("in/a", b"12345")
        device.publish("in/b", b"")
        first, second = server.receive(timeout=1.0), server.receive(timeout=1.0)
        assert first is not None and (first.topic, first.payload) == ("in/a", b"12345")
        assert second is not None and second.payload == b""
        assert server.receive(timeout=0) is None  # a timeout counts nothing
        server.publish("out/x", b"abcdefgh", qos=1, retain=True)
        received = device.receive(timeout=1.0)
        assert received is not None and received.payload == b"abcdefgh"
        assert broker.retained() == {"out/x": b"abcdefgh"}  # publish options passed through
    finally:
        server.close()
        device.close()
    families = parse_exposition(metrics.render())
    assert families["fedflock_bytes_received_total"].value() == 5
    assert families["fedflock_bytes_sent_total"].value() == 8
