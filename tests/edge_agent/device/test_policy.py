"""Parsing and validating the ``[policy]`` table."""

from __future__ import annotations

from typing import Any

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.device.policy import (
    POLICY_EXAMPLE,
    Budget,
    LoadLimits,
    Policy,
    Unknowns,
    Window,
    parse_policy,
)
from edge_agent.errors import ConfigError


def _example() -> dict[str, Any]:
    return tomllib.loads(POLICY_EXAMPLE)["policy"]


def test_an_absent_table_gives_the_documented_defaults() -> None:
    policy = parse_policy({})

    assert policy == Policy()
    assert (policy.require_charging, policy.min_battery_percent, policy.max_temperature_c) == (False, 50, 70)
    assert policy.max_cpu_load is None and policy.windows == () and policy.budget is None
    assert policy.unmetered_for == policy.require_network_for == {"download", "upload"}
    assert policy.windows_for == {"train"}
    assert (policy.unknown.battery, policy.unknown.charging, policy.unknown.memory) == ("allow", "deny", "deny")
    assert policy.load == LoadLimits(threads=None, cpu_share=1.0)


def test_the_example_parses_into_a_phone_like_policy() -> None:
    policy = parse_policy(_example())

    assert policy.require_charging is True
    assert policy.max_cpu_load == 0.15
    assert policy.windows == (Window(start=23 * 60, end=6 * 60),)
    assert policy.unmetered_for == {"train", "download", "upload"}
    assert all(getattr(policy.unknown, f) == "deny" for f in Unknowns.__dataclass_fields__)
    assert policy.budget == Budget(rounds=3, per="week")
    assert policy.load == LoadLimits(threads=2, cpu_share=0.5)


@pytest.mark.parametrize(
    ("device_class", "expected"),
    [("camera", Budget(rounds=1, per="month")), ("phone", Budget(rounds=3, per="week"))],
)
def test_the_device_class_picks_its_budget_or_falls_back_to_default(device_class: str, expected: Budget) -> None:
    assert parse_policy(_example(), device_class=device_class).budget == expected


def test_a_class_can_be_unlimited_despite_a_default_and_no_default_means_unlimited() -> None:
    table = {"budget": {"default": {"rounds": 3}, "gateway": "unlimited"}}

    assert parse_policy(table, device_class="gateway").budget is None
    assert parse_policy(table, device_class="phone").budget == Budget(rounds=3, per="week")
    assert parse_policy({"budget": {"camera": {"rounds": 1}}}, device_class="phone").budget is None


def test_a_period_can_be_a_number_of_seconds() -> None:
    budget = parse_policy({"budget": {"default": {"rounds": 2, "per": 3600}}}).budget

    assert budget is not None and budget.period_s == 3600.0
    assert Budget(rounds=1, per="month").period_s == 30 * 86400


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"min_battery_percent": "x"}, "policy.min_battery_percent: expected a number 0..100, got 'x'"),
        ({"min_battery_percent": 101}, "policy.min_battery_percent: expected a number 0..100, got 101"),
        ({"min_battery_percent": True}, "policy.min_battery_percent: expected a number 0..100, got True"),
        ({"require_charging": "yes"}, "policy.require_charging: expected true or false, got 'yes'"),
        ({"max_cpu_load": 0}, "policy.max_cpu_load: expected a number 0 < load <= 1, got 0"),
        ({"max_temperature_c": float("nan")}, "policy.max_temperature_c: expected a number 0..150, got nan"),
        ({"min_free_memory_mb": -1}, "policy.min_free_memory_mb: expected a number >= 0, got -1"),
        ({"frobnicate": 1}, "policy.frobnicate: unknown key (expected one of budget, load, "),
        ({"unknown": {"humidity": "deny"}}, "policy.unknown.humidity: unknown key"),
        ({"unknown": {"battery": "maybe"}}, "policy.unknown.battery: expected 'allow' or 'deny', got 'maybe'"),
        ({"unknown": "deny"}, "policy.unknown: expected a table, got 'deny'"),
        ({"windows": "22:00-06:00"}, "policy.windows: expected a list of strings, got '22:00-06:00'"),
        ({"windows": ["22:00-06:00", "25:00-06:00"]}, "policy.windows[1]: expected 'HH:MM-HH:MM' (24 h local"),
        ({"windows": ["22:00-22:00"]}, "policy.windows[0]: expected a non-empty window"),
        ({"windows": ["22:60-23:00"]}, "policy.windows[0]: expected 'HH:MM-HH:MM'"),
        ({"unmetered_for": ["upload", "continue"]}, "policy.unmetered_for: expected a subset of ['train', "),
        ({"require_network_for": [1]}, "policy.require_network_for: expected a list of strings, got [1]"),
        ({"budget": {"camera": {"per": "week"}}}, "policy.budget.camera.rounds: missing"),
        ({"budget": {"camera": {"rounds": 1.5}}}, "policy.budget.camera.rounds: expected an integer >= 0, got 1.5"),
        ({"budget": {"camera": {"rounds": 1, "per": "fortnight"}}}, "policy.budget.camera.per: expected one of"),
        ({"budget": {"camera": {"rounds": 1, "per": 0}}}, "policy.budget.camera.per: expected one of"),
        ({"budget": {"camera": {"rounds": 1, "often": 2}}}, "policy.budget.camera.often: unknown key"),
        ({"budget": {"camera": 3}}, "policy.budget.camera: expected {rounds = N, per = ...} or 'unlimited', got 3"),
        ({"load": {"threads": 0}}, "policy.load.threads: expected an integer >= 1, got 0"),
        ({"load": {"cpu_share": 0}}, "policy.load.cpu_share: expected a number 0 < share <= 1, got 0"),
        ({"load": {"cpu_share": 1.5}}, "policy.load.cpu_share: expected a number 0 < share <= 1, got 1.5"),
        ({"load": {"memory_headroom_mb": 64}}, "policy.load.memory_headroom_mb: unknown key"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key_path(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(table)

    assert caught.value.reason.startswith(message), caught.value.reason


def test_a_bad_budget_of_another_class_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match=r"policy\.budget\.camera\.rounds"):
        parse_policy({"budget": {"default": {"rounds": 3}, "camera": {"rounds": -1}}}, device_class="phone")


def test_the_table_itself_and_the_device_class_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^policy: expected a table, got \['x'\]$"):
        parse_policy(["x"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device class"):
        parse_policy({}, device_class="")


def test_direct_construction_is_validated_and_phase_sets_are_normalised() -> None:
    with pytest.raises(ConfigError, match="min_free_disk_mb"):
        Policy(min_free_disk_mb=-5)

    policy = Policy(unmetered_for={"upload"}, windows=[Window.parse("01:00-02:00")])  # type: ignore[arg-type]

    assert policy.unmetered_for == frozenset({"upload"}) and isinstance(policy.unmetered_for, frozenset)
    assert policy.windows == (Window(start=60, end=120),)


@pytest.mark.parametrize(
    ("text", "start", "end"), [("22:00-06:00", 1320, 360), ("0:00-24:00", 0, 1440), (" 07:30-09:05 ", 450, 545)]
)
def test_windows_parse_to_minutes_after_midnight(text: str, start: int, end: int) -> None:
    assert Window.parse(text) == Window(start=start, end=end)


@given(st.integers(0, 1439), st.integers(0, 1440))
def test_a_window_prints_as_it_parses(start: int, end: int) -> None:
    if start == end:
        return
    window = Window(start=start, end=end)

    assert Window.parse(str(window)) == window


@given(st.integers(0, 1439), st.integers(0, 1439), st.floats(0, 86_399.999))
def test_a_window_and_its_complement_split_the_day(start: int, end: int, seconds: float) -> None:
    """Whether or not it crosses midnight, exactly one of [a, b) and [b, a) holds any instant."""
    if start == end:
        return
    window, complement = Window(start=start, end=end), Window(start=end, end=start)

    assert window.contains(seconds) != complement.contains(seconds)
