"""Sensor probes for Linux devices: power (sysfs), thermal (sysfs), CPU, memory and disk (psutil).

Every sysfs path is read under an injectable ``root`` (``/`` on a device, a fake tree in tests).
Probes report *unknown* as ``None`` and never guess. A single unreadable item (one thermal zone,
one battery) is skipped; an error that leaves a whole reading unknowable (``OSError``,
``ValueError``, :class:`psutil.Error`) propagates so the monitor can log it once and report
``None`` (see :mod:`edge_agent.device.monitor`).

Power rules (``/sys/class/power_supply/*``):

* ``type`` ``Battery`` (system scope, ``present`` not ``0``) gives ``capacity`` in percent
  (or ``charge_now/charge_full``, ``energy_now/energy_full``) and ``status``. Several batteries
  are averaged. Peripheral batteries (``scope`` = ``Device``: a Bluetooth mouse) are ignored.
* ``type`` ``Mains``, ``USB*``, ``Wireless``, ``BrickID`` are external power; ``online`` = 1 means
  plugged in.
* ``charging`` is ``True`` when any external supply is online or any battery is ``Charging`` or
  ``Full``; ``False`` when an external supply reads offline or a battery is ``Discharging``;
  otherwise ``None``. A device on AC with no battery (a Pi on a USB charger exposing a supply)
  therefore reports ``charging=True, battery_percent=None``.
* No supply listed at all (no sysfs, not Linux) falls back to ``psutil.sensors_battery()``; if
  that is ``None`` too (a desktop, a container), both readings are ``None``. When sysfs lists
  supplies psutil is not asked: on Linux it reads the same directory, without the rules above.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from edge_agent.device.network import NetworkProbe
from edge_agent.device.state import NetworkState

log = logging.getLogger("fedflock.device")

#: Errors that make a reading unknown (the monitor reports ``None`` and logs once per field).
PROBE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, psutil.Error)

_EXTERNAL_POWER_TYPES = frozenset({"Mains", "Wireless", "BrickID"})
_CHARGING_STATUSES = frozenset({"Charging", "Full"})
#: plausible range for a thermal zone; drivers report -274000 or 2^31 for "no reading"
_MIN_TEMP_C = -40.0
_MAX_TEMP_C = 150.0
#: /proc/stat fields that add up to the total; guest time is already counted in user/nice
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_CPU_IDLE_FIELDS = ("idle", "iowait")


@dataclass(frozen=True, kw_only=True)
class PowerReading:
    battery_percent: float | None = None
    charging: bool | None = None


@dataclass(frozen=True, kw_only=True)
class MemoryReading:
    available_bytes: int | None = None
    total_bytes: int | None = None


# --- the parts of psutil the probes use (tests pass fakes) -------------------------------------


class CpuTimesLike(Protocol):
    @property
    def user(self) -> float: ...
    @property
    def system(self) -> float: ...
    @property
    def idle(self) -> float: ...


class MemoryLike(Protocol):
    @property
    def available(self) -> int: ...
    @property
    def total(self) -> int: ...


class DiskUsageLike(Protocol):
    @property
    def free(self) -> int: ...


class BatteryLike(Protocol):
    @property
    def percent(self) -> float: ...
    @property
    def power_plugged(self) -> bool | None: ...


class PsutilLike(Protocol):
    def cpu_times(self) -> CpuTimesLike: ...
    def virtual_memory(self) -> MemoryLike: ...
    def disk_usage(self, path: str) -> DiskUsageLike: ...
    def sensors_battery(self) -> BatteryLike | None: ...


class RealPsutil:
    """:class:`PsutilLike` backed by the installed psutil."""

    def cpu_times(self) -> CpuTimesLike:
        times: CpuTimesLike = psutil.cpu_times()
        return times

    def virtual_memory(self) -> MemoryLike:
        memory: MemoryLike = psutil.virtual_memory()
        return memory

    def disk_usage(self, path: str) -> DiskUsageLike:
        usage: DiskUsageLike = psutil.disk_usage(path)
        return usage

    def sensors_battery(self) -> BatteryLike | None:
        # absent on platforms psutil has no battery support for
        sensors_battery = getattr(psutil, "sensors_battery", None)
        battery: BatteryLike | None = sensors_battery() if sensors_battery is not None else None
        return battery


# --- the probe set the monitor reads -----------------------------------------------------------


class Probes(Protocol):
    """One method per reading; each may raise one of :data:`PROBE_ERRORS`."""

    def power(self) -> PowerReading: ...
    def temperature_c(self) -> float | None: ...
    def cpu_load(self) -> float | None: ...
    def memory(self) -> MemoryReading: ...
    def disk_free_bytes(self) -> int | None: ...
    def network(self) -> NetworkState: ...


class SystemProbes:
    """:class:`Probes` for a Linux device (sysfs/procfs under ``root``, psutil for the rest).

    ``state_dir`` is where the agent keeps its state; ``None`` (nothing persisted) makes the free
    disk space unknown. No I/O happens until a probe is called.
    """

    def __init__(
        self,
        *,
        root: Path = Path("/"),
        ps: PsutilLike | None = None,
        state_dir: Path | None = None,
        network: NetworkProbe | None = None,
    ) -> None:
        self._root = root
        self._ps: PsutilLike = ps if ps is not None else RealPsutil()
        self._state_dir = state_dir
        self._network = network if network is not None else NetworkProbe(root=root)
        self._cpu = CpuLoadMeter(self._ps)

    def power(self) -> PowerReading:
        return read_power(self._root, self._ps)

    def temperature_c(self) -> float | None:
        return read_temperature_c(self._root)

    def cpu_load(self) -> float | None:
        return self._cpu.read()

    def memory(self) -> MemoryReading:
        memory = self._ps.virtual_memory()
        return MemoryReading(available_bytes=int(memory.available), total_bytes=int(memory.total))

    def disk_free_bytes(self) -> int | None:
        if self._state_dir is None:
            return None
        # the state directory may not exist yet (before the first start): its filesystem is the
        # one of its nearest existing ancestor
        path = self._state_dir
        while not path.exists() and path.parent != path:
            path = path.parent
        return int(self._ps.disk_usage(str(path)).free)

    def network(self) -> NetworkState:
        return self._network.read()


# --- CPU ---------------------------------------------------------------------------------------


def busy_fraction(before: CpuTimesLike, after: CpuTimesLike) -> float | None:
    """Fraction of CPU time spent busy between two ``cpu_times()`` readings, 0..1.

    Same arithmetic as ``psutil.cpu_percent``: per-field deltas are clamped at 0 (Linux's iowait
    can go backwards) and ``None`` means no time elapsed.
    """
    deltas = {name: max(0.0, getattr(after, name, 0.0) - getattr(before, name, 0.0)) for name in _CPU_FIELDS}
    total = sum(deltas.values())
    if total <= 0.0:
        return None
    idle = sum(deltas[name] for name in _CPU_IDLE_FIELDS)
    return min(1.0, max(0.0, (total - idle) / total))


class CpuLoadMeter:
    """``psutil.cpu_percent(interval=None)`` as a 0..1 fraction, with its own baseline.

    Keeping the previous reading here (rather than psutil's per-thread module state) means other
    callers of ``psutil.cpu_percent`` and the thread the monitor runs on cannot shorten the
    interval. The first call only primes the baseline and returns ``None``.
    """

    def __init__(self, ps: PsutilLike) -> None:
        self._ps = ps
        self._lock = threading.Lock()
        self._previous: CpuTimesLike | None = None
        self._last: float | None = None

    def read(self) -> float | None:
        with self._lock:
            now = self._ps.cpu_times()
            if self._previous is None:
                self._previous = now
                return None
            fraction = busy_fraction(self._previous, now)
            if fraction is not None:  # two calls within one clock tick: keep the last answer
                self._previous, self._last = now, fraction
            return self._last


# --- power -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Supplies:
    capacities: tuple[float, ...] = ()
    statuses: tuple[str, ...] = ()
    external_online: tuple[bool, ...] = ()
    #: entries in the class directory, including ones ignored (peripheral batteries)
    seen: int = 0


def read_power(root: Path, ps: PsutilLike) -> PowerReading:
    """Battery level and charging state (rules in the module docstring)."""
    supplies = _scan_supplies(root / "sys/class/power_supply")
    if supplies.seen == 0:
        # psutil is not consulted when sysfs lists supplies: on Linux it reads the same directory
        # and would count a Bluetooth mouse's battery ("hidpp_battery_0") as the device's.
        return _psutil_power(ps)
    percent = sum(supplies.capacities) / len(supplies.capacities) if supplies.capacities else None
    return PowerReading(battery_percent=percent, charging=_charging(supplies))


def _charging(supplies: _Supplies) -> bool | None:
    if any(supplies.external_online) or _CHARGING_STATUSES.intersection(supplies.statuses):
        return True
    if supplies.external_online or "Discharging" in supplies.statuses:
        return False
    return None


def _psutil_power(ps: PsutilLike) -> PowerReading:
    battery = ps.sensors_battery()
    if battery is None:
        return PowerReading()
    return PowerReading(battery_percent=_clamp_percent(float(battery.percent)), charging=battery.power_plugged)


def _scan_supplies(directory: Path) -> _Supplies:
    capacities: list[float] = []
    statuses: list[str] = []
    online: list[bool] = []
    seen = 0
    for supply in _children(directory):
        seen += 1
        try:
            kind = _read(supply / "type")
            if kind == "Battery" and _is_system_battery(supply):
                statuses.append(_optional(supply / "status") or "Unknown")
                capacity = _battery_capacity(supply)
                if capacity is not None:
                    capacities.append(capacity)
            elif kind in _EXTERNAL_POWER_TYPES or kind.startswith("USB"):
                online.append(_read(supply / "online") == "1")
        except (OSError, ValueError) as exc:
            log.debug("skipping power supply %s: %s", supply.name, exc)
    return _Supplies(capacities=tuple(capacities), statuses=tuple(statuses), external_online=tuple(online), seen=seen)


def _is_system_battery(supply: Path) -> bool:
    if _optional(supply / "scope") == "Device":
        return False
    return _optional(supply / "present") != "0"


def _battery_capacity(supply: Path) -> float | None:
    capacity = _optional(supply / "capacity")
    if capacity is not None:
        return _clamp_percent(float(capacity))
    for prefix in ("charge", "energy"):
        now, full = _optional(supply / f"{prefix}_now"), _optional(supply / f"{prefix}_full")
        if now is not None and full is not None and float(full) > 0:
            return _clamp_percent(100.0 * float(now) / float(full))
    return None


def _clamp_percent(value: float) -> float:
    if not 0.0 <= value < 1000.0:  # NaN or nonsense; some fuel gauges overshoot 100 a little
        raise ValueError(f"battery capacity {value} is not a percentage")
    return min(100.0, value)


# --- thermal -----------------------------------------------------------------------------------


def read_temperature_c(root: Path) -> float | None:
    """The hottest plausible thermal zone in degrees Celsius; ``None`` when there is none."""
    readings: list[float] = []
    for zone in _children(root / "sys/class/thermal", "thermal_zone*"):
        try:
            celsius = int(_read(zone / "temp")) / 1000.0
        except (OSError, ValueError) as exc:  # disabled zones answer EINVAL/ENODATA
            log.debug("skipping %s: %s", zone.name, exc)
            continue
        if _MIN_TEMP_C <= celsius <= _MAX_TEMP_C:
            readings.append(celsius)
    return max(readings, default=None)


# --- sysfs helpers -----------------------------------------------------------------------------


def _children(directory: Path, pattern: str = "*") -> Iterator[Path]:
    """Entries of a sysfs class directory in name order; a missing directory has none."""
    if not directory.is_dir():
        return iter(())
    return iter(sorted(directory.glob(pattern)))


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii").strip()


def _optional(path: Path) -> str | None:
    """A sysfs attribute, or ``None`` when the driver does not provide it."""
    try:
        return _read(path)
    except FileNotFoundError:
        return None
