"""Building MQTT transports for devices and servers from a URL (shared by the CLI and the demo)."""

from __future__ import annotations

from edge_agent.config import AgentFileConfig, MqttSettings
from edge_agent.presence import offline_will, online_birth
from edge_agent.protocol.topics import Topics
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig, parse_mqtt_url


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


def configured_server_transport(mqtt: MqttSettings, client_id: str) -> MqttTransport:
    """The server's transport from its ``[mqtt]`` settings: TLS for mqtts:// urls, credentials from a file."""
    return MqttTransport(
        MqttConfig.from_url(
            mqtt.url,
            tls=_tls(mqtt),
            client_id=client_id,
            username=mqtt.username,
            password_file=mqtt.password_file,
            protocol=mqtt.protocol,
            **mqtt.reconnect.config_fields(),
        )
    )


def _tls(mqtt: MqttSettings) -> TlsConfig | None:
    """The TLS files ``mqtt`` names (None: none named; an mqtts:// url then trusts the system's CAs)."""
    if mqtt.ca_file is None and mqtt.cert_file is None:
        return None
    return TlsConfig(ca_file=mqtt.ca_file, cert_file=mqtt.cert_file, key_file=mqtt.key_file)


def configured_device_transport(config: AgentFileConfig, *, bundle_digest: str, num_examples: int) -> MqttTransport:
    """A device's transport from its config file: TLS when the url is mqtts:// or TLS files are given."""
    mqtt = config.mqtt
    topics = Topics(mqtt.topic_prefix)
    return MqttTransport(
        MqttConfig.from_url(
            mqtt.url,
            tls=_tls(mqtt),
            client_id=config.device_id,
            username=mqtt.username,
            password_file=mqtt.password_file,
            protocol=mqtt.protocol,
            **mqtt.reconnect.config_fields(),
            will=offline_will(config.device_id, topics),
            birth=online_birth(config.device_id, bundle_digest, num_examples, topics, device_class=config.device_class),
        )
    )
