"""MQTT topic layout (docs/protocol.md, "Topics").

Every device-specific topic has the device id as its third level so that a broker ACL pattern
such as ``fedflock/v1/devices/%c/#`` can confine a device to its own topics::

    {prefix}/devices/{device_id}/status    device -> all     retained, QoS 1, also the last will
    {prefix}/devices/{device_id}/tasks     server -> device  QoS 1
    {prefix}/devices/{device_id}/results   device -> server  QoS 1 (UPDATE, ERROR, CHUNK, CHUNK_ACK)
    {prefix}/models/{channel}              server -> all     retained, QoS 1: public model channels

The tasks topic is the device's inbox (TASK, CHUNK, CHUNK_ACK from the server). A device
publishes only under its own id and reads only its inbox and ``{prefix}/models/#``
(deploy/mosquitto/acl.example).

``prefix`` defaults to ``fedflock/v1``; deployments may set their own (one prefix per federation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_agent.errors import ConfigError, ContractViolation

DEFAULT_PREFIX = "fedflock/v1"
STATUS = "status"
TASKS = "tasks"
RESULTS = "results"
KINDS = (STATUS, TASKS, RESULTS)

DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_device_id(device_id: str) -> str:
    """Device ids are 1..64 of ``[A-Za-z0-9_-]``: safe in topics, file names and ACL patterns."""
    if not DEVICE_ID_PATTERN.match(device_id):
        raise ConfigError(f"invalid device id {device_id!r}: use 1-64 characters of A-Z a-z 0-9 _ -")
    return device_id


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def device(self, device_id: str, kind: str) -> str:
        return f"{self.prefix}/devices/{device_id}/{kind}"

    def status(self, device_id: str) -> str:
        return self.device(device_id, STATUS)

    def tasks(self, device_id: str) -> str:
        return self.device(device_id, TASKS)

    def results(self, device_id: str) -> str:
        return self.device(device_id, RESULTS)

    def model_channel(self, channel: str) -> str:
        """A public, retained model channel (e.g. ``current``) every device may read."""
        if not DEVICE_ID_PATTERN.match(channel):
            raise ConfigError(f"invalid model channel {channel!r}")
        return f"{self.prefix}/models/{channel}"

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one kind of topic of every device."""
        return f"{self.prefix}/devices/+/{kind}"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a device topic into ``(device_id, kind)``; raises on anything else."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise ContractViolation(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[1] not in KINDS or not DEVICE_ID_PATTERN.match(parts[0]):
            raise ContractViolation(f"topic {topic!r} is not a fedflock device topic")
        return parts[0], parts[1]
