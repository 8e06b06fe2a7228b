"""Building MQTT transports for devices and servers from a URL (shared by the CLI and the demo)."""

from __future__ import annotations

from edge_agent.agent import offline_will, online_birth
from edge_agent.protocol.topics import Topics
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url


def device_transport(
    url: str, device_id: str, *, bundle_digest: str, num_examples: int, topics: Topics
) -> MqttTransport:
    """A device's transport: retained "offline" will, and "online" status again on every reconnect."""
    host, port = parse_mqtt_url(url)
    return MqttTransport(
        MqttConfig(
            host=host,
            port=port,
            client_id=device_id,
            will=offline_will(device_id, topics),
            birth=online_birth(device_id, bundle_digest, num_examples, topics),
        )
    )


def server_transport(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))
