"""Simulated device profiles: battery, charging, network, temperature, compute, dropouts (pure).

Every model here is a frozen dataclass and a pure function of *simulated* time ``t`` (seconds
since midnight of day 0, local time). A :class:`SimClock` maps real time to simulated time with
a time-scale factor, so a day of battery drain and charging passes in minutes of real time; tests
drive the same functions with plain numbers.

What each device reports to its agent (through ``edge_agent.device.fake.ScriptedMonitor``) is
:func:`sensors_at`: battery level and charging state, temperature, network kind / metered /
link, memory. The agent's own eligibility policy (``edge_agent.device.eligibility.decide``) turns
those into decisions and reasons, exactly as on a real device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from edge_agent.device.state import NetworkState
from edge_agent.errors import ConfigError

__all__ = [
    "DAY_S",
    "Battery",
    "DeviceProfile",
    "Network",
    "SimClock",
    "Thermal",
    "battery_percent",
    "charging_at",
    "in_windows",
    "network_at",
    "sensors_at",
    "temperature_at",
]

DAY_S = 86_400.0
#: a daily window as (start hour, end hour), local time, [start, end); crosses midnight if end < start
HourWindow = tuple[float, float]


def in_windows(t: float, windows: tuple[HourWindow, ...]) -> bool:
    """Whether simulated time ``t`` falls inside one of the daily ``windows``."""
    hour = (t % DAY_S) / 3600.0
    return any((start <= hour < end) if start < end else (hour >= start or hour < end) for start, end in windows)


def _window_edges(windows: tuple[HourWindow, ...], t0: float, t1: float) -> list[float]:
    """Every window start or end in ``(t0, t1)``, sorted: where the charging state may change."""
    edges = []
    first_day = math.floor(t0 / DAY_S)
    for day in range(first_day, math.floor(t1 / DAY_S) + 1):
        for start, end in windows:
            for hour in (start, end):
                edge = day * DAY_S + hour * 3600.0
                if t0 < edge < t1:
                    edges.append(edge)
    return sorted(edges)


@dataclass(frozen=True, kw_only=True)
class Battery:
    """A battery that drains off the charger and charges on it, on a daily charging schedule.

    ``mains``: no battery at all (a gateway, a workstation): always "charging", level unknown.
    """

    mains: bool = False
    start_percent: float = 80.0
    drain_per_hour: float = 5.0
    charge_per_hour: float = 40.0
    charge_windows: tuple[HourWindow, ...] = ((22.0, 7.0),)

    def __post_init__(self) -> None:
        if not 0 <= self.start_percent <= 100:
            raise ConfigError(f"battery.start_percent: expected 0..100, got {self.start_percent!r}")
        if self.drain_per_hour < 0 or self.charge_per_hour < 0:
            raise ConfigError("battery.drain_per_hour and battery.charge_per_hour must be >= 0")
        _check_windows(self.charge_windows, "battery.charge_windows")


def charging_at(battery: Battery, t: float) -> bool:
    return battery.mains or in_windows(t, battery.charge_windows)


def battery_percent(battery: Battery, t: float) -> float | None:
    """The level at simulated time ``t`` (``None`` on mains), integrating drain and charge
    segment by segment from ``t = 0`` (clamped to 0..100 in every segment)."""
    if battery.mains:
        return None
    level, now = battery.start_percent, 0.0
    for edge in [*_window_edges(battery.charge_windows, 0.0, t), t]:
        if edge <= now:
            continue
        hours = (edge - now) / 3600.0
        rate = battery.charge_per_hour if charging_at(battery, (now + edge) / 2) else -battery.drain_per_hour
        level = min(100.0, max(0.0, level + rate * hours))
        now = edge
    return level


@dataclass(frozen=True, kw_only=True)
class Network:
    """The device's link: ``kind`` at home, ``away_kind`` (e.g. cellular) inside ``away_windows``,
    and no link at all during ``outages`` (simulated ``(start, end)`` seconds)."""

    kind: str = "wifi"
    metered: bool = False
    away_kind: str = "cellular"
    away_windows: tuple[HourWindow, ...] = ()
    outages: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        for name, kind in (("kind", self.kind), ("away_kind", self.away_kind)):
            if kind not in ("ethernet", "wifi", "cellular"):
                raise ConfigError(f"network.{name}: expected ethernet, wifi or cellular, got {kind!r}")
        _check_windows(self.away_windows, "network.away_windows")


def network_at(network: Network, t: float) -> NetworkState:
    if any(start <= t < end for start, end in network.outages):
        return NetworkState(interface=None, kind="none", metered=None, link_up=False)
    if in_windows(t, network.away_windows):
        kind = network.away_kind
        return NetworkState(interface="wwan0", kind=kind, metered=kind == "cellular", link_up=True)
    interface = {"ethernet": "eth0", "wifi": "wlan0", "cellular": "wwan0"}[network.kind]
    metered = network.metered or network.kind == "cellular"
    return NetworkState(interface=interface, kind=network.kind, metered=metered, link_up=True)


@dataclass(frozen=True, kw_only=True)
class Thermal:
    """Temperature: ``base_c`` plus a daily swing (hottest at 15:00) plus ``charging_c`` on the charger."""

    base_c: float = 35.0
    daily_swing_c: float = 0.0
    charging_c: float = 0.0


def temperature_at(thermal: Thermal, charging: bool, t: float) -> float:
    hour = (t % DAY_S) / 3600.0
    swing = thermal.daily_swing_c * math.cos((hour - 15.0) / 24.0 * 2 * math.pi)
    return thermal.base_c + swing + (thermal.charging_c if charging else 0.0)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One simulated device: its sensors' models, compute speed and dropout probability.

    ``compute_factor`` >= 1: training takes that many times as long as on this host (the real
    onnxruntime training runs, then the device sleeps for the rest). ``dropout`` is the
    probability that the device drops off the network in the middle of a task (the broker
    publishes its will) for ``dropout_hold_s`` real seconds.
    """

    kind: str
    battery: Battery = field(default_factory=lambda: Battery(mains=True))
    network: Network = field(default_factory=Network)
    thermal: Thermal = field(default_factory=Thermal)
    memory_mb: float = 2048.0
    compute_factor: float = 1.0
    dropout: float = 0.0
    dropout_hold_s: float = 10.0
    device_class: str = "default"

    def __post_init__(self) -> None:
        if not self.compute_factor >= 1.0:
            raise ConfigError(f"compute_factor: expected a number >= 1, got {self.compute_factor!r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ConfigError(f"dropout: expected a probability 0..1, got {self.dropout!r}")
        if self.memory_mb <= 0 or self.dropout_hold_s < 0:
            raise ConfigError("memory_mb must be > 0 and dropout_hold_s >= 0")


def sensors_at(profile: DeviceProfile, t: float) -> dict[str, Any]:
    """The device's readings at simulated time ``t``, as ``ScriptedMonitor`` fields."""
    charging = charging_at(profile.battery, t)
    memory = int(profile.memory_mb * (1 << 20))
    return {
        "battery_percent": battery_percent(profile.battery, t),
        "charging": charging,
        "temperature_c": temperature_at(profile.thermal, charging, t),
        "network": network_at(profile.network, t),
        "memory_available_bytes": memory // 2,
        "memory_total_bytes": memory,
        "disk_free_bytes": 8 << 30,
    }


class SimClock:
    """Simulated seconds since midnight of day 0: ``start_hour`` plus real time × ``time_scale``.

    ``epoch``: the real time (``real_clock``'s) at which simulated time started; processes that
    share it share one simulated clock. Default: now."""

    def __init__(
        self,
        *,
        time_scale: float,
        start_hour: float = 8.0,
        real_clock: Callable[[], float] = time.time,
        epoch: float | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ConfigError(f"time_scale: expected a positive number, got {time_scale!r}")
        self._scale = time_scale
        self._start = start_hour * 3600.0
        self._real = real_clock
        self._t0 = real_clock() if epoch is None else epoch

    def now(self) -> float:
        return self._start + (self._real() - self._t0) * self._scale

    def local_now(self) -> datetime:
        """The simulated local time (day 0 is 2024-01-01), for the policy's time windows."""
        return datetime(2024, 1, 1) + timedelta(seconds=self.now())


def _check_windows(windows: tuple[HourWindow, ...], name: str) -> None:
    for window in windows:
        start, end = window
        if not (0 <= start < 24 and 0 <= end <= 24 and start != end):
            raise ConfigError(f"{name}: expected hour windows like (22, 7), got {window!r}")
