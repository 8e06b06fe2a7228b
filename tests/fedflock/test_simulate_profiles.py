"""The simulator's pure parts: profile models on a fake clock, mixes, fleets, report rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from fedflock.simulate.mixes import MIXES, draw_fleet, load_mix, parse_mix
from fedflock.simulate.profiles import (
    Battery,
    Network,
    SimClock,
    Thermal,
    battery_percent,
    charging_at,
    in_windows,
    network_at,
    temperature_at,
)
from fedflock.simulate.report import decline_reasons, dropouts_in
from fedflock.simulate.storm import peak_rate, time_to_fraction

H = 3600.0


def test_battery_drains_off_the_charger_and_charges_on_it() -> None:
    battery = Battery(start_percent=80.0, drain_per_hour=5.0, charge_per_hour=40.0, charge_windows=((22.0, 7.0),))
    assert battery_percent(battery, 0.0) == 80.0
    # midnight to 07:00 on the charger: 80 + 7 h * 40 %/h, clamped at 100
    assert battery_percent(battery, 7 * H) == 100.0
    # then 15 h off it (07:00-22:00): 100 - 15 * 5 = 25
    assert battery_percent(battery, 22 * H) == pytest.approx(25.0)
    # one more hour on it
    assert battery_percent(battery, 23 * H) == pytest.approx(65.0)
    drained = Battery(start_percent=10.0, drain_per_hour=5.0, charge_windows=((23.0, 23.5),))
    assert battery_percent(drained, 10 * H) == 0.0  # clamped, never negative
    assert charging_at(battery, 23 * H) and not charging_at(battery, 12 * H)
    assert battery_percent(Battery(mains=True), 5 * H) is None and charging_at(Battery(mains=True), 12 * H)


def test_windows_cross_midnight_and_repeat_daily() -> None:
    night = ((22.0, 6.0),)
    assert in_windows(23 * H, night) and in_windows(2 * H, night) and not in_windows(12 * H, night)
    assert in_windows(86_400 + 23 * H, night) and not in_windows(86_400 + 7 * H, night)


def test_network_outages_away_windows_and_metering() -> None:
    network = Network(kind="wifi", away_kind="cellular", away_windows=((8.0, 18.0),), outages=((100.0, 200.0),))
    assert network_at(network, 150.0).kind == "none" and network_at(network, 150.0).link_up is False
    assert network_at(network, 3 * H).kind == "wifi" and network_at(network, 3 * H).metered is False
    away = network_at(network, 12 * H)
    assert away.kind == "cellular" and away.metered is True


def test_temperature_peaks_in_the_afternoon_and_on_the_charger() -> None:
    thermal = Thermal(base_c=40.0, daily_swing_c=10.0, charging_c=5.0)
    assert temperature_at(thermal, False, 15 * H) == pytest.approx(50.0)
    assert temperature_at(thermal, False, 3 * H) == pytest.approx(30.0)
    assert temperature_at(thermal, True, 15 * H) == pytest.approx(55.0)


def test_sim_clock_scales_injected_real_time() -> None:
    now = [1000.0]
    clock = SimClock(time_scale=60.0, start_hour=8.0, real_clock=lambda: now[0])
    assert clock.now() == 8 * H
    now[0] += 30.0  # half a real minute: half a simulated hour
    assert clock.now() == 8.5 * H
    assert clock.local_now().hour == 8 and clock.local_now().minute == 30
    shared = SimClock(time_scale=60.0, start_hour=8.0, real_clock=lambda: now[0], epoch=1000.0)
    assert shared.now() == clock.now()


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    mix = load_mix("mixed")
    first, again, other = draw_fleet(mix, 50, 7), draw_fleet(mix, 50, 7), draw_fleet(mix, 50, 8)
    assert first == again
    assert first != other
    kinds = [d.profile_name for d in first]
    assert (kinds.count("phone"), kinds.count("gateway"), kinds.count("tablet")) == (25, 15, 10)  # shares 0.5/0.3/0.2
    phones = [d for d in first if d.profile_name == "phone"]
    assert len({d.profile.battery.start_percent for d in phones}) == len(phones)  # drawn per device
    assert all(d.policy.min_battery_percent == 50 for d in phones)


def test_every_named_mix_parses() -> None:
    for name in MIXES:
        assert draw_fleet(load_mix(name), 10, 0)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"profiles": {"p": {"dropout": 1.5}}}, "profiles.p.dropout"),
        ({"profiles": {"p": {"compute_factor": [3, 1]}}}, "profiles.p.compute_factor"),
        ({"profiles": {"p": {"charge_windows": ["25:00-07:00"]}}}, "profiles.p.charge_windows"),
        ({"profiles": {"p": {"network": "5g"}}}, "profiles.p.network"),
        ({"profiles": {"p": {"policy": {"min_battery_percent": 200}}}}, "profiles.p.policy.min_battery_percent"),
        ({"profiles": {"p": {"wheels": 4}}}, "profiles.p.wheels"),
        ({"alpha": 0, "profiles": {"p": {}}}, "alpha"),
        ({"profiles": {}}, "profiles"),
    ],
)
def test_bad_mix_is_a_config_error_naming_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_mix(table)


def test_a_toml_mix_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('name = "mine"\nalpha = 0.2\n[profiles.cam]\nmains = true\nnetwork = "ethernet"\ndropout = 0.1\n')
    mix = load_mix(str(path))
    assert mix.name == "mine" and mix.alpha == 0.2 and mix.profiles[0].name == "cam"
    assert draw_fleet(mix, 3, 0)[0].profile.dropout == 0.1
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("[profiles")
        load_mix(str(tmp_path / "bad.toml"))


def test_report_counts() -> None:
    decisions = [
        {"phase": "train", "eligible": False, "reasons": [{"code": "battery_low"}, {"code": "not_charging"}]},
        {"phase": "train", "eligible": False, "reasons": [{"code": "battery_low"}]},
        {"phase": "train", "eligible": True, "reasons": []},
        {"phase": "upload", "eligible": False, "reasons": [{"code": "network_metered"}]},
        {},
    ]
    assert decline_reasons(decisions) == {"battery_low": 2, "not_charging": 1}
    assert dropouts_in([1.0, 2.0, 3.0], 1.0, 3.0) == 2
    assert peak_rate([0.1, 0.2, 0.3, 1.1], 1.0) == 3.0 and peak_rate([0.1, 0.2, 0.3, 1.1], 0.25) == 8.0
    assert time_to_fraction([10.5, 11.0, 12.0, 13.0], 10.0, 4, 0.75) == 2.0
    assert time_to_fraction([10.5], 10.0, 4, 0.99) is None
