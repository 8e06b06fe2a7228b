"""A snapshot of what the device can afford right now.

Every reading is optional: ``None`` means *unknown* (a desktop without a battery, a container
without thermal zones, a sensor that failed to read). Unknown is reported as such, never guessed;
the eligibility policy states how each unknown is treated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Network kinds a probe can report.
NETWORK_KINDS = ("ethernet", "wifi", "cellular", "none", "unknown")


@dataclass(frozen=True, kw_only=True)
class NetworkState:
    """The active (default-route) network interface."""

    #: interface name ("eth0", "wlan0", "wwan0"), ``None`` when there is none or it is unknown
    interface: str | None = None
    #: one of :data:`NETWORK_KINDS`
    kind: str = "unknown"
    #: billed by volume (cellular, a phone hotspot); ``None`` = unknown
    metered: bool | None = None
    #: carrier up on the interface; ``None`` = unknown
    link_up: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in NETWORK_KINDS:
            raise ValueError(f"network kind must be one of {NETWORK_KINDS}, got {self.kind!r}")


@dataclass(frozen=True, kw_only=True)
class DeviceState:
    """One sample of the device's sensors, taken at wall-clock time ``taken_at`` (Unix seconds)."""

    taken_at: float
    #: 0..100
    battery_percent: float | None = None
    #: on external power (charging, full on the charger, or a device with no battery on AC)
    charging: bool | None = None
    #: CPU busy fraction of all cores, 0..1, over the last sampling interval
    cpu_load: float | None = None
    #: memory available to a new process (psutil ``available``), bytes
    memory_available_bytes: int | None = None
    memory_total_bytes: int | None = None
    #: hottest thermal zone, degrees Celsius
    temperature_c: float | None = None
    #: free space on the filesystem holding the agent's state directory, bytes
    disk_free_bytes: int | None = None
    network: NetworkState = field(default_factory=NetworkState)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``None`` for unknown), as reported to the server in STATUS."""
        return asdict(self)
