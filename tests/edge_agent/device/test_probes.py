from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.device.probes import (
    CpuLoadMeter,
    PowerReading,
    SystemProbes,
    busy_fraction,
    read_power,
    read_temperature_c,
)
from tests.edge_agent.device import sysfs_trees as trees
from tests.edge_agent.device.sysfs_trees import Battery, FakePsutil, Times

# --- power: whole devices ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (trees.raspberry_pi_ups_discharging, PowerReading(battery_percent=57.0, charging=False)),
        (trees.laptop_charging_on_mains, PowerReading(battery_percent=80.0, charging=True)),
        (trees.desktop_without_sensors, PowerReading(battery_percent=None, charging=None)),
        (trees.phone_full_on_usb, PowerReading(battery_percent=100.0, charging=True)),
    ],
    ids=["pi-ups-discharging", "laptop-mains-charging", "desktop-nothing", "phone-full-usb"],
)
def test_power_on_devices(tmp_path: Path, build: Callable[[Path], Path], expected: PowerReading) -> None:
    assert read_power(build(tmp_path), FakePsutil(battery=None)) == expected


def test_psutil_is_not_asked_when_sysfs_lists_supplies(tmp_path: Path) -> None:
    # only a Bluetooth mouse battery: psutil (which reads the same directory) would report it
    trees.power_supply(tmp_path, "hidpp_battery_0", type="Battery", status="Discharging", capacity=5, scope="Device")
    ps = FakePsutil(battery=Battery(percent=5.0, power_plugged=False))
    assert read_power(tmp_path, ps) == PowerReading(battery_percent=None, charging=None)
    assert ps.battery_calls == 0


@pytest.mark.parametrize(
    ("thermal", "expected"),
    [
        (trees.raspberry_pi_ups_discharging, 61.3),
        (trees.laptop_charging_on_mains, 72.5),  # hottest; the -274 C dummy zone is ignored
        (trees.desktop_without_sensors, None),
        (trees.phone_full_on_usb, 38.0),
    ],
)
def test_temperature_on_devices(tmp_path: Path, thermal: Callable[[Path], Path], expected: float | None) -> None:
    assert read_temperature_c(thermal(tmp_path)) == expected


# --- power: the rules -----------------------------------------------------------------------------


def test_ac_online_without_battery_is_charging_with_unknown_level(tmp_path: Path) -> None:
    trees.power_supply(tmp_path, "rpi-usb", type="USB_PD", online=1)
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=None, charging=True)


@pytest.mark.parametrize(("status", "charging"), [("Full", True), ("Charging", True), ("Discharging", False)])
def test_battery_status_alone_decides_charging(tmp_path: Path, status: str, charging: bool) -> None:
    trees.power_supply(tmp_path, "battery", type="Battery", status=status, capacity=99)
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=99.0, charging=charging)


def test_batteries_are_averaged_and_absent_ones_skipped(tmp_path: Path) -> None:
    trees.power_supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity=90)
    trees.power_supply(tmp_path, "BAT1", type="Battery", status="Discharging", charge_now=1000, charge_full=4000)
    trees.power_supply(tmp_path, "BAT2", type="Battery", status="Unknown", capacity=0, present=0)
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=57.5, charging=False)


def test_unknown_status_without_external_supply_is_unknown(tmp_path: Path) -> None:
    trees.power_supply(tmp_path, "BAT0", type="Battery", status="Unknown", capacity=101)  # gauges overshoot
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=100.0, charging=None)


def test_offline_charger_and_not_charging_battery_is_not_charging(tmp_path: Path) -> None:
    trees.power_supply(tmp_path, "BAT0", type="Battery", status="Not charging", capacity=40)
    trees.power_supply(tmp_path, "ucsi-source-psy-1", type="USB_C", online=0)
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=40.0, charging=False)


def test_unreadable_supply_is_skipped(tmp_path: Path) -> None:
    trees.power_supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity="garbage")
    trees.power_supply(tmp_path, "AC", type="Mains")  # no `online` attribute
    assert read_power(tmp_path, FakePsutil()) == PowerReading(battery_percent=None, charging=False)


@pytest.mark.parametrize(
    ("battery", "expected"),
    [
        (Battery(percent=64.0, power_plugged=True), PowerReading(battery_percent=64.0, charging=True)),
        (Battery(percent=64.0, power_plugged=None), PowerReading(battery_percent=64.0, charging=None)),
        (None, PowerReading(battery_percent=None, charging=None)),
    ],
)
def test_no_sysfs_supplies_falls_back_to_psutil(
    tmp_path: Path, battery: Battery | None, expected: PowerReading
) -> None:
    (tmp_path / "sys/class/power_supply").mkdir(parents=True)  # empty, or missing: same answer
    ps = FakePsutil(battery=battery)
    assert read_power(tmp_path, ps) == expected
    assert ps.battery_calls == 1


def test_absurd_psutil_battery_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a percentage"):
        read_power(tmp_path, FakePsutil(battery=Battery(percent=-1.0, power_plugged=None)))


# --- thermal --------------------------------------------------------------------------------------


def test_unreadable_and_absurd_zones_are_ignored(tmp_path: Path) -> None:
    trees.thermal_zone(tmp_path, 0, "not a number")
    trees.thermal_zone(tmp_path, 1, 151000)
    trees.thermal_zone(tmp_path, 2, -41000)
    trees.thermal_zone(tmp_path, 3, -5500)
    (tmp_path / "sys/class/thermal/thermal_zone4").mkdir()  # disabled zone: no temp
    (tmp_path / "sys/class/thermal/cooling_device0").mkdir()
    trees.write(tmp_path, {"sys/class/thermal/cooling_device0/temp": "99000"})  # not a zone
    assert read_temperature_c(tmp_path) == -5.5


def test_no_thermal_class_is_unknown(tmp_path: Path) -> None:
    assert read_temperature_c(tmp_path) is None


# --- CPU, memory, disk ----------------------------------------------------------------------------


def test_cpu_meter_primes_then_reports_busy_fraction() -> None:
    ps = FakePsutil(
        times=[
            Times(user=10, system=10, idle=80),
            Times(user=40, system=20, idle=100, iowait=10),  # busy 40 of 70
            Times(user=40, system=20, idle=100, iowait=10),  # no time passed: last answer
        ]
    )
    meter = CpuLoadMeter(ps)
    assert meter.read() is None
    assert meter.read() == pytest.approx(40 / 70)
    assert meter.read() == pytest.approx(40 / 70)


def test_busy_fraction_ignores_guest_time_and_backwards_counters() -> None:
    before = Times(user=100, idle=100, iowait=50, guest=0)
    after = Times(user=150, idle=150, iowait=40, guest=50)  # guest is inside user; iowait went back
    assert busy_fraction(before, after) == pytest.approx(0.5)


@given(
    st.lists(st.floats(min_value=0, max_value=1e9), min_size=4, max_size=4),
    st.lists(st.floats(min_value=0, max_value=1e9), min_size=4, max_size=4),
)
def test_busy_fraction_is_a_fraction(a: list[float], b: list[float]) -> None:
    fraction = busy_fraction(Times(*a), Times(*b))
    assert fraction is None or 0.0 <= fraction <= 1.0


def test_memory_and_disk_come_from_psutil(tmp_path: Path) -> None:
    ps = FakePsutil()
    probes = SystemProbes(root=tmp_path, ps=ps, state_dir=tmp_path / "state")
    memory = probes.memory()
    assert (memory.available_bytes, memory.total_bytes) == (3 * 2**30, 4 * 2**30)
    assert probes.disk_free_bytes() == 10 * 2**30
    # the state directory does not exist yet: its nearest existing ancestor's filesystem is asked
    assert ps.disk_paths == [str(tmp_path)]
    (tmp_path / "state").mkdir()
    probes.disk_free_bytes()
    assert ps.disk_paths[-1] == str(tmp_path / "state")


def test_disk_is_unknown_without_a_state_dir(tmp_path: Path) -> None:
    ps = FakePsutil()
    assert SystemProbes(root=tmp_path, ps=ps).disk_free_bytes() is None
    assert ps.disk_paths == []
