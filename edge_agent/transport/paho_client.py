"""The only module in fedflock that imports paho-mqtt.

``mqtt.py`` (the transport) and ``hub.py`` (many clients on one network thread) use paho only
through the names and helpers here: building a configured client, the bare MQTT 5 probe of
``protocol="auto"``, MQTT 5 property blocks and reason-code descriptions. Keeping paho behind one
module keeps its version-specific quirks (FIELD_NOTES.md) in one place.
"""

from __future__ import annotations

import time
from ssl import SSLContext

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.errors import TransportError
from edge_agent.transport import mqtt_config, tls
from edge_agent.transport.mqtt_config import MqttConfig

__all__ = [
    "MQTT_ERR_NO_CONN",
    "MQTT_ERR_SUCCESS",
    "Client",
    "MQTTMessage",
    "PacketTypes",
    "Properties",
    "ReasonCode",
    "describe",
    "error_string",
    "new_client",
    "probe_v5",
    "properties",
]

Client = mqtt.Client
MQTTMessage = mqtt.MQTTMessage
MQTT_ERR_SUCCESS = mqtt.MQTT_ERR_SUCCESS
MQTT_ERR_NO_CONN = mqtt.MQTT_ERR_NO_CONN
error_string = mqtt.error_string


def new_client(config: MqttConfig, *, v5: bool, context: SSLContext | None, password: str | None) -> mqtt.Client:
    """A paho client for ``config`` (will, TLS, credentials set; no callbacks, not connected)."""
    if v5:  # clean start and session expiry are sent by connect()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=config.clean_session,
            protocol=mqtt.MQTTv311,
        )
    client.on_log = mqtt_config.forward_paho_log
    client.connect_timeout = config.connect_timeout
    if config.will is not None:
        will = config.will
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if context is not None:
        client.tls_set_context(context)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    return client


def probe_v5(config: MqttConfig, secrets: tls.Secrets, deadline: float) -> bool:
    """Whether the broker speaks MQTT 5, asked with a bare CONNECT: no will, no credentials,
    empty client id (so no session of ours is touched), clean start; DISCONNECT right after.

    Any CONNACK but "Unsupported protocol version" proves MQTT 5, even a refusal (the real
    CONNECT will report that); a connection closed without CONNACK means 3.1.1.
    """
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    probe.on_log = mqtt_config.forward_paho_log
    probe.connect_timeout = config.connect_timeout
    if secrets.context is not None:
        probe.tls_set_context(secrets.context)
    codes: list[ReasonCode] = []
    probe.on_connect = lambda client, userdata, flags, code, properties: codes.append(code)
    try:
        probe.connect(config.host, config.port, keepalive=config.keepalive)
        while not codes and time.monotonic() < deadline:
            if probe.loop(timeout=min(0.1, max(0.0, deadline - time.monotonic()))) != mqtt.MQTT_ERR_SUCCESS:
                break  # closed by the broker
    except (OSError, ValueError) as exc:
        raise TransportError(tls.describe_connect_error(config.host, config.port, config.url, exc)) from exc
    finally:
        probe.disconnect()
    refusal = secrets.tls_refusal(config.host, config.port)
    if refusal is not None and not codes:
        raise TransportError(refusal)
    if not codes and time.monotonic() >= deadline:
        raise TransportError(f"no CONNACK from {config.url} within {config.connect_timeout}s")
    return bool(codes) and codes[0].value != mqtt_config.UNSUPPORTED_PROTOCOL_VERSION


def properties(packet_type: int, **values: int | None) -> Properties | None:
    """MQTT 5 properties holding the non-zero ``values``; ``None`` if there are none."""
    block = Properties(packet_type)
    for name, value in values.items():
        if value:
            setattr(block, name, value)
    return None if block.isEmpty() else block


def describe(reason_code: ReasonCode) -> str:
    return mqtt_config.describe_reason(reason_code.getName(), reason_code.value)
