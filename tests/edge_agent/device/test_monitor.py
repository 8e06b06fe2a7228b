from __future__ import annotations

import logging
import threading
from pathlib import Path

import psutil
import pytest

from edge_agent.device.fake import FakeProbes, ScriptedMonitor
from edge_agent.device.monitor import Monitor, MonitorConfig, ResourceMonitor
from edge_agent.device.network import NetworkProbe
from edge_agent.device.probes import MemoryReading, PowerReading, SystemProbes
from edge_agent.device.state import NETWORK_KINDS, DeviceState, NetworkState
from edge_agent.errors import ConfigError
from tests.edge_agent.device import sysfs_trees as trees
from tests.edge_agent.device.sysfs_trees import FakePsutil, Times

WIFI = NetworkState(interface="wlan0", kind="wifi", metered=False, link_up=True)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def healthy_probes() -> FakeProbes:
    return FakeProbes(
        power=PowerReading(battery_percent=55.0, charging=False),
        temperature=48.5,
        cpu=0.25,
        memory=MemoryReading(available_bytes=1_000, total_bytes=4_000),
        disk_free=9_000,
        network=WIFI,
    )


def monitor(probes: FakeProbes, monotonic: Clock | None = None, interval_s: float = 30.0) -> ResourceMonitor:
    return ResourceMonitor(
        MonitorConfig(interval_s=interval_s),
        probes=probes,
        wall_clock=lambda: 1_700_000_000.0,
        monotonic=monotonic or Clock(),
    )


def test_sample_fills_every_field_from_the_probes() -> None:
    state = monitor(healthy_probes()).sample()
    assert state == DeviceState(
        taken_at=1_700_000_000.0,
        battery_percent=55.0,
        charging=False,
        cpu_load=0.25,
        memory_available_bytes=1_000,
        memory_total_bytes=4_000,
        temperature_c=48.5,
        disk_free_bytes=9_000,
        network=WIFI,
    )


def test_a_whole_device_through_the_real_probes(tmp_path: Path) -> None:
    root = trees.phone_full_on_usb(tmp_path)
    ps = FakePsutil(times=[Times(user=1, idle=9), Times(user=4, idle=16)])
    probes = SystemProbes(root=root, ps=ps, state_dir=tmp_path, network=NetworkProbe(root=root, which=lambda _: None))
    device = ResourceMonitor(probes=probes, wall_clock=lambda: 5.0)
    first, second = device.sample(), device.sample()
    assert first.cpu_load is None  # the meter primes on the first sample
    assert second.cpu_load == pytest.approx(0.3)
    assert (second.battery_percent, second.charging, second.temperature_c) == (100.0, True, 38.0)
    assert second.network == NetworkState(interface="wwan0", kind="cellular", metered=True, link_up=True)
    assert (second.memory_total_bytes, second.disk_free_bytes) == (4 * 2**30, 10 * 2**30)


def test_latest_reuses_a_young_sample_and_refreshes_an_old_one() -> None:
    probes, clock = healthy_probes(), Clock(100.0)
    device = monitor(probes, clock, interval_s=30.0)
    first = device.latest()
    probes.cpu = 0.75
    clock.now = 130.0
    assert device.latest() is first
    assert probes.reads["cpu_load"] == 1
    clock.now = 130.1
    assert device.latest().cpu_load == 0.75
    assert probes.reads["cpu_load"] == 2


def test_latest_max_age_overrides_the_interval_and_sample_refreshes_the_cache() -> None:
    probes, clock = healthy_probes(), Clock(0.0)
    device = monitor(probes, clock, interval_s=30.0)
    device.latest()
    clock.now = 5.0
    probes.temperature = 70.0
    assert device.latest(max_age_s=10.0).temperature_c == 48.5
    assert device.latest(max_age_s=1.0).temperature_c == 70.0
    probes.temperature = 80.0
    fresh = device.sample()
    assert device.latest() is fresh


def test_probe_failures_become_none_and_are_logged_once_per_field(caplog: pytest.LogCaptureFixture) -> None:
    probes = healthy_probes()
    probes.temperature = OSError(5, "Input/output error")
    probes.cpu = psutil.AccessDenied()
    probes.power_reading = ValueError("battery capacity nan is not a percentage")
    probes.network_state = PermissionError("/proc/net/route")
    device = monitor(probes)
    with caplog.at_level(logging.DEBUG, logger="fedflock.device"):
        states = [device.sample(), device.sample()]
    for state in states:
        assert (state.temperature_c, state.cpu_load, state.battery_percent, state.charging) == (None,) * 4
        assert state.network == NetworkState(kind="unknown")
        assert state.disk_free_bytes == 9_000  # the healthy probes still answer
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fedflock.device"]
    assert sorted(r.getMessage().split()[2] for r in warnings) == ["cpu_load", "network", "power", "temperature_c"]
    assert "OSError" in next(r.getMessage() for r in warnings if "temperature_c" in r.getMessage())


def test_a_bug_in_a_probe_is_not_hidden() -> None:
    probes = healthy_probes()
    probes.temperature = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        monitor(probes).sample()


def test_background_sampler_samples_every_interval_until_closed() -> None:
    probes = healthy_probes()
    timeouts: list[float] = []
    third_wait = threading.Event()

    def wait(stop: threading.Event, timeout_s: float) -> bool:
        timeouts.append(timeout_s)
        if len(timeouts) < 3:
            return False
        third_wait.set()
        return stop.wait()  # park until close()

    device = ResourceMonitor(MonitorConfig(interval_s=7.5), probes=probes, monotonic=Clock(), wait=wait)
    with device:
        assert third_wait.wait(5.0)
        assert device.running
        assert probes.reads["power"] == 3
        device.latest()  # served from the sampler's cache
        assert probes.reads["power"] == 3
        device.start()  # already running: no second thread
    assert not device.running
    assert timeouts == [7.5, 7.5, 7.5]
    device.close()  # twice is fine


def test_background_sampler_survives_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    probes = healthy_probes()
    probes.cpu = RuntimeError("bug")
    sampled_again = threading.Event()
    waits = 0

    def wait(stop: threading.Event, timeout_s: float) -> bool:
        nonlocal waits
        waits += 1
        if waits == 1:
            probes.cpu = 0.5  # the bug goes away
            return False
        sampled_again.set()
        return stop.wait()

    device = ResourceMonitor(probes=probes, monotonic=Clock(), wait=wait)
    with caplog.at_level(logging.ERROR, logger="fedflock.device"), device:
        assert sampled_again.wait(5.0)
        assert device.latest().cpu_load == 0.5
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["device sampling failed"]


def test_constructor_does_no_io() -> None:
    probes = healthy_probes()
    ResourceMonitor(probes=probes)
    assert probes.reads == {}


def test_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        MonitorConfig(interval_s=0.0)


# --- ScriptedMonitor ----------------------------------------------------------------------------


def test_scripted_monitor_readings_are_values_or_functions_of_time() -> None:
    clock = Clock(0.0)
    scripted = ScriptedMonitor(clock=clock, battery_percent=80.0, charging=False)
    scripted.set(battery_percent=lambda t: max(0.0, 80.0 - t / 60), network=WIFI)
    assert isinstance(scripted, Monitor)
    assert scripted.sample() == DeviceState(taken_at=0.0, battery_percent=80.0, charging=False, network=WIFI)
    clock.now = 600.0
    assert scripted.latest().battery_percent == 70.0
    scripted.set(charging=None, temperature_c=lambda t: 40.0 + t / 100)
    state = scripted.sample()
    assert (state.taken_at, state.charging, state.temperature_c) == (600.0, None, 46.0)
    assert scripted.samples == 3


def test_scripted_monitor_rejects_unknown_readings() -> None:
    with pytest.raises(TypeError, match="battery"):
        ScriptedMonitor(battery=10)
    with pytest.raises(TypeError, match="taken_at"):
        ScriptedMonitor().set(taken_at=1.0)


# --- this machine -------------------------------------------------------------------------------


def test_sample_on_this_machine(tmp_path: Path) -> None:
    device = ResourceMonitor(MonitorConfig(state_dir=tmp_path))
    assert isinstance(device, Monitor)
    device.sample()
    state = device.sample()
    assert state.cpu_load is None or 0.0 <= state.cpu_load <= 1.0
    assert state.memory_total_bytes is not None and state.memory_total_bytes > 0
    assert state.memory_available_bytes is not None and 0 < state.memory_available_bytes <= state.memory_total_bytes
    assert state.disk_free_bytes is not None and state.disk_free_bytes > 0
    assert state.network.kind in NETWORK_KINDS
    assert state.battery_percent is None or 0.0 <= state.battery_percent <= 100.0
    assert state.temperature_c is None or -40.0 <= state.temperature_c <= 150.0
    assert state.as_dict()["network"]["kind"] == state.network.kind
