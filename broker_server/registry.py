"""Which devices exist and which are online, learned from their retained status messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol.messages import StatusMessage


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
        if eligibility.get("phase") not in (None, "train", "continue"):
            previous = self._devices.get(status.device_id)
            eligibility = previous.eligibility if previous is not None else {}
        self._devices[status.device_id] = DeviceRecord(
            device_id=status.device_id,
            online=status.online,
            bundle_digest=status.bundle_digest,
            num_examples=status.num_examples,
            agent_version=status.agent_version,
            last_seen=now,
            eligibility=eligibility,
        )

    def eligible(self, bundle_digest: str) -> list[str]:
        """Online devices that hold the bundle the server trains and have not reported that they
        cannot train now (their STATUS eligibility), sorted for reproducible sampling."""
        return sorted(
            d.device_id
            for d in self._devices.values()
            if d.online and d.bundle_digest == bundle_digest and not d.declines
        )

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)
