from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from edge_agent.device.network import (
    CommandResult,
    NetworkConfig,
    NetworkProbe,
    NmcliMetered,
    interface_kind,
    link_up,
    parse_nmcli_metered,
    run_command,
)
from edge_agent.device.state import NetworkState
from edge_agent.errors import ConfigError
from tests.edge_agent.device import sysfs_trees as trees


class FakeRunner:
    """Answers nmcli with a fixed result, or raises; records every command."""

    def __init__(self, stdout: str = "", *, returncode: int = 0, error: OSError | None = None) -> None:
        self.stdout, self.returncode, self.error = stdout, returncode, error
        self.calls: list[tuple[Sequence[str], float]] = []

    def __call__(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        self.calls.append((tuple(argv), timeout_s))
        if self.error is not None:
            raise self.error
        return CommandResult(returncode=self.returncode, stdout=self.stdout)


def on_path(name: str) -> str | None:
    return f"/usr/bin/{name}"


def not_on_path(name: str) -> str | None:
    return None


def probe(
    root: Path,
    config: NetworkConfig | None = None,
    *,
    runner: FakeRunner | None = None,
    which: Callable[[str], str | None] = not_on_path,
) -> NetworkProbe:
    return NetworkProbe(config, root=root, runner=runner or FakeRunner(), which=which)


# --- whole devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (trees.raspberry_pi_ups_discharging, NetworkState(interface="wlan0", kind="wifi", link_up=True)),
        (trees.laptop_charging_on_mains, NetworkState(interface="eth0", kind="ethernet", link_up=True)),
        (trees.desktop_without_sensors, NetworkState(interface="eth0", kind="ethernet", link_up=True)),
        (trees.phone_full_on_usb, NetworkState(interface="wwan0", kind="cellular", metered=True, link_up=True)),
    ],
    ids=["pi-wifi", "laptop-ethernet-over-wifi", "desktop-ethernet", "phone-qmi-cellular"],
)
def test_network_on_devices(tmp_path: Path, build: Callable[[Path], Path], expected: NetworkState) -> None:
    assert probe(build(tmp_path)).read() == expected


def test_no_default_route_is_none(tmp_path: Path) -> None:
    trees.routes(tmp_path, [("eth0", "0001A8C0", 0)])
    trees.interface(tmp_path, "eth0")
    assert probe(tmp_path).read() == NetworkState(interface=None, kind="none")


def test_unreadable_route_table_is_unknown(tmp_path: Path) -> None:
    assert probe(tmp_path).read() == NetworkState(interface=None, kind="unknown")


def test_lowest_metric_default_wins_and_ties_go_to_the_first(tmp_path: Path) -> None:
    trees.routes(tmp_path, [("wlan0", "00000000", 600), ("wwan0", "00000000", 50), ("eth0", "00000000", 50)])
    trees.interface(tmp_path, "wwan0", link_type=519, operstate="unknown")
    assert probe(tmp_path).read().interface == "wwan0"


def test_ipv6_only_default_route_is_used(tmp_path: Path) -> None:
    trees.routes(tmp_path, [])
    trees.ipv6_default(tmp_path, "rmnet_data0")
    trees.interface(tmp_path, "rmnet_data0", link_type=519, operstate="unknown", carrier="1")
    state = probe(tmp_path).read()
    assert state == NetworkState(interface="rmnet_data0", kind="cellular", metered=True, link_up=True)


def test_malformed_route_lines_are_skipped(tmp_path: Path) -> None:
    text = (
        trees.ROUTE_HEADER + "\nbogus line\neth0\tzz\t0\t0003\t0\t0\t0\t00000000\neth1\t00000000\t0\t0001\t0\t0\t5\t0"
    )
    trees.write(tmp_path, {"proc/net/route": text})
    trees.interface(tmp_path, "eth1")
    assert probe(tmp_path).read().interface == "eth1"


# --- kind ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "kind"),
    [
        ("wlan0", {"wireless": True}, "wifi"),
        ("wlp2s0", {"devtype": "wlan"}, "wifi"),
        ("wwp0s20u4i6", {"link_type": 1}, "cellular"),
        ("usb0", {"devtype": "wwan"}, "cellular"),
        ("usb1", {"driver": "cdc_mbim"}, "cellular"),
        ("usb2", {"driver": "cdc_ether"}, "ethernet"),  # USB dongles and phone tethering alike
        ("usb3", {"driver": "rndis_host"}, "ethernet"),
        ("ppp0", {"link_type": 512, "operstate": "unknown"}, "cellular"),
        ("modem0", {"link_type": 519}, "cellular"),
        ("rmnet_ipa0", {"link_type": 65534}, "cellular"),
        ("tun0", {"link_type": 65534, "operstate": "unknown"}, "unknown"),  # a VPN: can't see through
        ("wg0", {"link_type": 65534}, "unknown"),
        ("enp3s0", {"link_type": 1}, "ethernet"),
        ("eth9", {"link_type": None}, "unknown"),
    ],
)
def test_interface_kind(tmp_path: Path, name: str, options: dict[str, object], kind: str) -> None:
    trees.interface(tmp_path, name, **options)  # type: ignore[arg-type]
    assert interface_kind(tmp_path, name) == kind


def test_interface_missing_from_sysfs_is_unknown(tmp_path: Path) -> None:
    assert interface_kind(tmp_path, "eth0") == "unknown"
    assert link_up(tmp_path, "eth0") is None


@pytest.mark.parametrize(
    ("operstate", "carrier", "expected"),
    [
        ("up", "0", True),
        ("down", "1", False),
        ("lowerlayerdown", None, False),
        ("dormant", "1", False),
        ("unknown", "1", True),
        ("unknown", "0", False),
        ("unknown", None, None),  # carrier unreadable (admin-down answers EINVAL)
        ("testing", "garbage", None),
    ],
)
def test_link_up(tmp_path: Path, operstate: str, carrier: str | None, expected: bool | None) -> None:
    trees.interface(tmp_path, "eth0", operstate=operstate, carrier=carrier)
    assert link_up(tmp_path, "eth0") is expected


# --- metered ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("GENERAL.METERED:yes\n", True),
        ("GENERAL.METERED:yes (guessed)\n", True),
        ("GENERAL.METERED:no\n", False),
        ("GENERAL.METERED:no (guessed)", False),
        ("GENERAL.METERED:unknown\n", None),
        ("GENERAL.METERED:\n", None),
        ("", None),
        ("GENERAL.DEVICE:wlan0\nGENERAL.METERED:YES\n", True),
        ("no (guessed)\n", False),  # `-g` style bare value
        ("Error: Device 'x' not found.", None),
    ],
)
def test_parse_nmcli_metered(output: str, expected: bool | None) -> None:
    assert parse_nmcli_metered(output) is expected


def nmcli_probe(tmp_path: Path, runner: FakeRunner, config: NetworkConfig | None = None) -> NetworkProbe:
    trees.routes(tmp_path, [("wlan0", "00000000", 600)])
    trees.interface(tmp_path, "wlan0", wireless=True)
    return probe(tmp_path, config, runner=runner, which=on_path)


def test_nmcli_answer_is_used_with_a_timeout(tmp_path: Path) -> None:
    runner = FakeRunner("GENERAL.METERED:yes (guessed)\n")
    assert nmcli_probe(tmp_path, runner).read().metered is True
    argv, timeout_s = runner.calls[0]
    assert argv == ("/usr/bin/nmcli", "-t", "-f", "GENERAL.METERED", "device", "show", "wlan0")
    assert timeout_s == 2.0


@pytest.mark.parametrize(
    "runner",
    [
        FakeRunner("GENERAL.METERED:unknown"),
        FakeRunner("Error: NetworkManager is not running.", returncode=8),
        FakeRunner(error=TimeoutError("nmcli did not answer")),
        FakeRunner(error=FileNotFoundError("nmcli")),
    ],
    ids=["unknown", "exit-8", "timeout", "vanished"],
)
def test_nmcli_without_an_answer_falls_through(tmp_path: Path, runner: FakeRunner) -> None:
    assert nmcli_probe(tmp_path, runner).read().metered is None  # wifi: unknown
    assert len(runner.calls) == 1


def test_nmcli_not_on_path_is_not_run(tmp_path: Path) -> None:
    runner = FakeRunner("GENERAL.METERED:yes")
    state = probe(trees.phone_full_on_usb(tmp_path), runner=runner, which=not_on_path).read()
    assert state.metered is True  # cellular default
    assert runner.calls == []


def test_nmcli_can_say_a_cellular_link_is_unmetered(tmp_path: Path) -> None:
    runner = FakeRunner("GENERAL.METERED:no")
    assert probe(trees.phone_full_on_usb(tmp_path), runner=runner, which=on_path).read().metered is False


def test_config_override_beats_nmcli(tmp_path: Path) -> None:
    runner = FakeRunner("GENERAL.METERED:no")
    config = NetworkConfig(metered={"wl*": True})
    assert nmcli_probe(tmp_path, runner, config).read().metered is True
    assert runner.calls == []


def test_exact_override_beats_glob_and_globs_go_in_order(tmp_path: Path) -> None:
    config = NetworkConfig(metered={"wwan*": True, "ww*": False, "wwan0": False})
    assert probe(trees.phone_full_on_usb(tmp_path), config).read().metered is False
    config = NetworkConfig(metered={"wwan*": False, "ww*": True})
    assert probe(tmp_path, config).read().metered is False


def test_nmcli_disabled_in_config(tmp_path: Path) -> None:
    runner = FakeRunner("GENERAL.METERED:yes")
    assert nmcli_probe(tmp_path, runner, NetworkConfig(use_nmcli=False)).read().metered is None
    assert runner.calls == []


def test_nmcli_answers_are_cached_per_interface() -> None:
    now = [0.0]
    runner = FakeRunner("GENERAL.METERED:yes")
    nmcli = NmcliMetered(runner=runner, which=on_path, clock=lambda: now[0], cache_s=60.0)
    assert [nmcli.metered("wlan0"), nmcli.metered("wlan0"), nmcli.metered("eth0")] == [True, True, True]
    assert [call[0][-1] for call in runner.calls] == ["wlan0", "eth0"]
    now[0] = 59.9
    runner.stdout = "GENERAL.METERED:no"
    assert nmcli.metered("wlan0") is True
    now[0] = 60.0
    assert nmcli.metered("wlan0") is False
    assert len(runner.calls) == 3


def test_nmcli_failures_are_cached_too() -> None:
    runner = FakeRunner(error=TimeoutError("slow"))
    nmcli = NmcliMetered(runner=runner, which=on_path, clock=lambda: 5.0)
    assert nmcli.metered("wlan0") is None
    assert nmcli.metered("wlan0") is None
    assert len(runner.calls) == 1


@pytest.mark.parametrize(
    "config",
    [
        {"nmcli_timeout_s": 0.0},
        {"nmcli_cache_s": -1.0},
        {"metered": {"wwan*": "yes"}},
    ],
)
def test_bad_network_config_is_rejected(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        NetworkConfig(**config)  # type: ignore[arg-type]


# --- the real subprocess runner -----------------------------------------------------------------


def test_run_command_returns_output_in_the_c_locale() -> None:
    result = run_command([sys.executable, "-c", "import os; print(os.environ['LC_ALL'])"], timeout_s=10.0)
    assert result == CommandResult(returncode=0, stdout="C\n")


def test_run_command_timeout_is_a_timeout_error() -> None:
    with pytest.raises(TimeoutError, match="did not answer"):
        run_command([sys.executable, "-c", "import time; time.sleep(10)"], timeout_s=0.2)


def test_run_command_missing_binary_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        run_command([str(tmp_path / "nmcli")], timeout_s=1.0)
