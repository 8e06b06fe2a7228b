"""Fake sysfs/procfs trees for the device probes, laid out like the real ones under a root dir,
and a fake psutil."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"


def write(root: Path, files: Mapping[str, str]) -> Path:
    """Write ``relative path -> content`` (a trailing newline added, as sysfs does)."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return root


def power_supply(root: Path, name: str, **attributes: str | int) -> None:
    write(root, {f"sys/class/power_supply/{name}/{key}": str(value) for key, value in attributes.items()})


def thermal_zone(root: Path, index: int, millidegrees: int | str) -> None:
    write(root, {f"sys/class/thermal/thermal_zone{index}/temp": str(millidegrees)})


def interface(
    root: Path,
    name: str,
    *,
    link_type: int | None = 1,
    operstate: str = "up",
    carrier: str | None = "1",
    wireless: bool = False,
    driver: str | None = None,
    devtype: str | None = None,
) -> Path:
    """``/sys/class/net/<name>``; ``driver`` becomes a ``device/driver`` symlink like the kernel's."""
    iface = root / "sys/class/net" / name
    files = {"operstate": operstate}
    if link_type is not None:
        files["type"] = str(link_type)
    if carrier is not None:
        files["carrier"] = carrier
    files["uevent"] = f"INTERFACE={name}\nIFINDEX=3" + (f"\nDEVTYPE={devtype}" if devtype else "")
    write(iface, files)
    if wireless:
        (iface / "wireless").mkdir()
    if driver is not None:
        target = root / "sys/bus/usb/drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (iface / "device").mkdir()
        (iface / "device" / "driver").symlink_to(target)
    return iface


def routes(root: Path, rows: Sequence[tuple[str, str, int]]) -> None:
    """``/proc/net/route`` with ``(interface, destination hex, metric)`` rows (mask from destination)."""
    lines = [ROUTE_HEADER]
    for iface, destination, metric in rows:
        mask = "00000000" if destination == "00000000" else "00FFFFFF"
        lines.append(f"{iface}\t{destination}\t010200C0\t0003\t0\t0\t{metric}\t{mask}\t0\t0\t0")
    write(root, {"proc/net/route": "\n".join(lines)})


def ipv6_default(root: Path, iface: str, metric: int = 1024) -> None:
    zeros = "0" * 32
    lines = [
        f"{zeros} 00 {zeros} 00 fe800000000000000000000000000001 {metric:08x} 00000001 00000000 00450003 {iface}",
        f"{zeros} 00 {zeros} 00 {zeros} ffffffff 00000001 00000000 00200200 lo",
    ]
    write(root, {"proc/net/ipv6_route": "\n".join(lines)})


# --- whole devices ------------------------------------------------------------------------------


def raspberry_pi_ups_discharging(root: Path) -> Path:
    """A Pi 4 with a UPS HAT fuel gauge (max17040) on battery, the SoC zone at 61.3 C."""
    power_supply(root, "max17040_battery", type="Battery", status="Discharging", capacity=57, present=1)
    power_supply(root, "rpi-poe-power-supply", type="Mains", online=0)
    thermal_zone(root, 0, 61300)
    routes(root, [("wlan0", "00000000", 600), ("wlan0", "0001A8C0", 600)])
    interface(root, "wlan0", wireless=True, devtype="wlan")
    return root


def laptop_charging_on_mains(root: Path) -> Path:
    """A laptop charging on AC, with a Bluetooth mouse battery that must be ignored."""
    power_supply(root, "AC", type="Mains", online=1)
    power_supply(root, "BAT0", type="Battery", status="Charging", capacity=80, present=1, scope="System")
    power_supply(root, "hidpp_battery_0", type="Battery", status="Discharging", capacity=5, scope="Device")
    thermal_zone(root, 0, 45000)
    thermal_zone(root, 1, 72500)
    thermal_zone(root, 2, -274000)  # a zone with no sensor behind it
    routes(root, [("eth0", "00000000", 100), ("wlan0", "00000000", 600)])
    interface(root, "eth0")
    interface(root, "wlan0", wireless=True)
    return root


def desktop_without_sensors(root: Path) -> Path:
    """A desktop or container: sysfs mounted, no power supplies, no thermal zones."""
    (root / "sys/class/power_supply").mkdir(parents=True)
    (root / "sys/class/thermal").mkdir(parents=True)
    routes(root, [("eth0", "00000000", 0)])
    interface(root, "eth0")
    return root


def phone_full_on_usb(root: Path) -> Path:
    """A Linux phone (PinePhone-like) full on a USB charger, on cellular through a QMI modem."""
    power_supply(root, "axp20x-battery", type="Battery", status="Full", capacity=100, present=1)
    power_supply(root, "axp20x-usb", type="USB", online=1)
    thermal_zone(root, 0, 38000)
    routes(root, [("wwan0", "00000000", 700)])
    interface(root, "wwan0", link_type=65534, operstate="unknown", carrier="1", driver="qmi_wwan")
    return root


# --- psutil ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Times:
    user: float = 0.0
    system: float = 0.0
    idle: float = 0.0
    iowait: float = 0.0
    guest: float = 0.0


@dataclass(frozen=True)
class Memory:
    available: int
    total: int


@dataclass(frozen=True)
class Disk:
    free: int


@dataclass(frozen=True)
class Battery:
    percent: float
    power_plugged: bool | None


class FakePsutil:
    def __init__(self, *, battery: Battery | None = None, times: list[Times] | None = None) -> None:
        self.battery = battery
        self.times = list(times or [Times()])
        self.disk_paths: list[str] = []
        self.battery_calls = 0

    def cpu_times(self) -> Times:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]

    def virtual_memory(self) -> Memory:
        return Memory(available=3 * 2**30, total=4 * 2**30)

    def disk_usage(self, path: str) -> Disk:
        self.disk_paths.append(path)
        return Disk(free=10 * 2**30)

    def sensors_battery(self) -> Battery | None:
        self.battery_calls += 1
        return self.battery
