"""Many MqttTransports on one ClientHub thread against a real Mosquitto."""

from __future__ import annotations

import random
import threading
import time
import uuid

from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.transport.base import Will
from edge_agent.transport.hub import ClientHub
from edge_agent.transport.mqtt import MqttConfig, MqttTransport


def _wait(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_one_hub_thread_serves_many_transports(mosquitto: MosquittoProcess) -> None:
    prefix = f"hub-{uuid.uuid4().hex[:8]}"
    threads_before = threading.active_count()
    inbound = threading.Semaphore(0)
    with ClientHub() as hub:
        devices = [
            MqttTransport(
                MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"{prefix}-{i}", protocol="5"),
                hub=hub,
                on_inbound=inbound.release,
            )
            for i in range(50)
        ]
        for number, device in enumerate(devices):
            device.start()
            device.subscribe(f"{prefix}/to/{number}")
        assert threading.active_count() == threads_before + 1  # the hub thread, not one per client
        with MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"{prefix}-pub")) as pub:
            for number in range(50):
                pub.publish(f"{prefix}/to/{number}", f"hi {number}".encode())
            for number, device in enumerate(devices):
                message = device.receive(timeout=5)
                assert message is not None and message.payload == f"hi {number}".encode()
        assert all(inbound.acquire(timeout=1) for _ in range(50))  # the hook ran once per message
        for number, device in enumerate(devices):  # publishing from this thread goes through the hub
            device.publish(f"{prefix}/from/{number}", b"x" * 100)
        stats = hub.stats()
        assert stats.connected == 50 and stats.connects == 50
        assert stats.bytes_out == 50 * 100 and stats.bytes_in == sum(len(f"hi {n}") for n in range(50))
        for device in devices:
            device.close()
        assert _wait(lambda: hub.stats().clients == 0)


def test_dropped_connection_publishes_the_will_and_comes_back_after_the_hold(mosquitto: MosquittoProcess) -> None:
    prefix = f"hubdrop-{uuid.uuid4().hex[:8]}"
    will = Will(topic=f"{prefix}/status", payload=b"offline", retain=False)
    with (
        ClientHub() as hub,
        MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"{prefix}-w")) as watcher,
    ):
        watcher.subscribe(f"{prefix}/status")
        device = MqttTransport(
            MqttConfig(
                host=mosquitto.host,
                port=mosquitto.port,
                client_id=f"{prefix}-dev",
                will=will,
                reconnect_min_delay=0.05,
                reconnect_max_delay=0.1,
            ),
            hub=hub,
            rng=random.Random(0),
        )
        device.start()
        dropped_at = time.monotonic()
        device.drop_connection(hold_s=1.0)
        message = watcher.receive(timeout=5)
        assert message is not None and message.payload == b"offline"  # no DISCONNECT: the broker sent the will
        assert _wait(device.is_connected, 10)
        assert time.monotonic() - dropped_at >= 1.0  # not before the hold ended
        assert hub.stats().connects == 2
        device.close()
