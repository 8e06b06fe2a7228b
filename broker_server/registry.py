"""Which devices exist and which are online, learned from their retained status messages.

A device's class (for stratified selection, :func:`broker_server.selection.select`) is the
``device_class`` its STATUS capabilities announce, if it announces one; otherwise
:data:`DEFAULT_DEVICE_CLASS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol.messages import StatusMessage

#: the class of a device that announces none (or an unusable one)
DEFAULT_DEVICE_CLASS = "default"
#: a longer announced class is ignored (it is a label, and selection keeps one list per class)
MAX_CLASS_LENGTH = 64


def device_class_of(capabilities: dict[str, Any]) -> str:
    """The ``device_class`` a STATUS announces: a non-empty string of at most 64 characters."""
    value = capabilities.get("device_class")
    if isinstance(value, str) and 0 < len(value) <= MAX_CLASS_LENGTH:
        return value
    return DEFAULT_DEVICE_CLASS


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    online: bool
    bundle_digest: str
    num_examples: int
    agent_version: str
    last_seen: float
    #: the device's last eligibility decision as it reported it (STATUS ``eligibility``; {} = none)
    eligibility: dict[str, Any] = field(default_factory=dict)
    #: what the device announced it speaks (STATUS ``capabilities``; {} while offline)
    capabilities: dict[str, Any] = field(default_factory=dict)
    device_class: str = DEFAULT_DEVICE_CLASS
    #: how many times the device came online (an online STATUS after its offline will, or the first
    #: one seen); a round re-sends a TASK sent before the last one (broker_server.task_resend). A
    #: STATUS without eligibility is no sign of a reconnect: agents re-publish one after installing
    #: a model, and the broker publishes the will of a connection that a reconnect takes over.
    connects: int = 0

    @property
    def declines(self) -> bool:
        """The device said it cannot train now (a reported, not eligible train/continue decision;
        a device that may not *upload* yet can still train and upload later)."""
        return self.eligibility.get("eligible") is False and self.eligibility.get("phase") in ("train", "continue")


class DeviceRegistry:
    def __init__(self) -> None:
        self._devices: dict[str, DeviceRecord] = {}

    def observe(self, status: StatusMessage, now: float) -> None:
        # selection needs the train decision: an upload/download one keeps the last train one
        eligibility = dict(status.eligibility)
        previous = self._devices.get(status.device_id)
        if eligibility.get("phase") not in (None, "train", "continue"):
            eligibility = previous.eligibility if previous is not None else {}
        connects = previous.connects if previous is not None else 0
        if status.online and (previous is None or not previous.online):
            connects += 1
        self._devices[status.device_id] = DeviceRecord(
            device_id=status.device_id,
            online=status.online,
            bundle_digest=status.bundle_digest,
            num_examples=status.num_examples,
            agent_version=status.agent_version,
            last_seen=now,
            eligibility=eligibility,
            capabilities=dict(status.capabilities),
            device_class=device_class_of(status.capabilities),
            connects=connects,
        )

    def eligible(self, bundle_digest: str) -> list[str]:
        """Online devices that hold the bundle the server trains and have not reported that they
        cannot train now (their STATUS eligibility), sorted for reproducible sampling."""
        return sorted(
            d.device_id
            for d in self._devices.values()
            if d.online and d.bundle_digest == bundle_digest and not d.declines
        )

    def records(self) -> list[DeviceRecord]:
        """Every device seen, as a copy (safe to read from another thread)."""
        return list(self._devices.values())

    def candidates(self, bundle_digest: str) -> list[DeviceRecord]:
        """Online devices that hold ``bundle_digest``, sorted by id; unlike :meth:`eligible` this
        includes devices that declined, so selection can say why it left them out."""
        return sorted(
            (d for d in self._devices.values() if d.online and d.bundle_digest == bundle_digest),
            key=lambda d: d.device_id,
        )

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def connects(self, device_id: str) -> int:
        """How many times ``device_id`` came online (0: never seen)."""
        record = self._devices.get(device_id)
        return 0 if record is None else record.connects

    def __len__(self) -> int:
        return len(self._devices)
