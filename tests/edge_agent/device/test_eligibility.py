"""The "may I train / keep training / download / upload now?" decision."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.device.eligibility import DECISION_PHASES, REASON_CODES, Decision, Reason, decide
from edge_agent.device.policy import POLICY_EXAMPLE, UNKNOWN_SENSORS, Policy, Unknowns, Window, parse_policy
from edge_agent.device.state import DeviceState, NetworkState

MB = 1 << 20
DAY = 86_400.0
TAKEN_AT = 1_700_000_000.0
NOON = datetime(2024, 5, 1, 12, 0)
ETHERNET = NetworkState(interface="eth0", kind="ethernet", metered=None, link_up=True)
WIFI = NetworkState(interface="wlan0", kind="wifi", metered=False, link_up=True)


def _pi(**changes: Any) -> DeviceState:
    """A mains-powered Raspberry Pi on ethernet, as the probes report it: no battery, not hot, idle."""
    base = DeviceState(
        taken_at=TAKEN_AT,
        battery_percent=None,
        charging=True,
        cpu_load=0.05,
        memory_available_bytes=2048 * MB,
        memory_total_bytes=4096 * MB,
        temperature_c=48.0,
        disk_free_bytes=10_000 * MB,
        network=ETHERNET,
    )
    return replace(base, **changes)


def _phone(**changes: Any) -> DeviceState:
    return _pi(**{"battery_percent": 80.0, "charging": True, "network": WIFI, **changes})


def _example(device_class: str = "default") -> Policy:
    return parse_policy(tomllib.loads(POLICY_EXAMPLE)["policy"], device_class=device_class)


@pytest.mark.parametrize("phase", DECISION_PHASES)
def test_a_pi_on_ethernet_without_a_battery_is_eligible_under_the_default_policy(phase: str) -> None:
    decision = decide(_pi(charging=None), Policy(), phase=phase, now=NOON, working_set_bytes=500 * MB)

    assert decision == Decision(phase=phase, reasons=())
    assert decision.eligible and str(decision) == "eligible"


def test_battery_falling_below_the_threshold_stops_training_in_progress() -> None:
    policy = Policy(min_battery_percent=60)

    decision = decide(_phone(battery_percent=23.0, charging=False), policy, phase="continue", now=NOON)

    assert not decision.eligible
    assert decision.codes == ("battery_low", "not_charging")
    assert str(decision) == "not eligible: battery 23% < 60%, not charging"


def test_plugging_the_charger_in_makes_a_low_battery_eligible() -> None:
    policy = Policy(min_battery_percent=60)

    decision = decide(_phone(battery_percent=23.0, charging=True), policy, phase="continue", now=NOON)

    assert decision.eligible


def test_enough_battery_is_eligible_off_the_charger_unless_charging_is_required() -> None:
    state = _phone(battery_percent=95.0, charging=False)

    assert decide(state, Policy(), phase="train", now=NOON).eligible
    required = decide(state, Policy(require_charging=True), phase="train", now=NOON)
    assert str(required) == "not eligible: not charging"


def test_a_metered_network_blocks_the_upload_but_not_training() -> None:
    state = _phone(network=replace(WIFI, metered=True))

    upload = decide(state, Policy(), phase="upload", now=NOON)
    train = decide(state, Policy(), phase="train", now=NOON)

    assert str(upload) == "not eligible: network metered"
    assert upload.codes == ("network_metered",)
    assert train.eligible


def test_cellular_without_a_metered_flag_counts_as_metered() -> None:
    state = _phone(network=NetworkState(interface="wwan0", kind="cellular", metered=None, link_up=True))

    assert decide(state, Policy(), phase="download", now=NOON).codes == ("network_metered",)


def test_without_a_link_transfers_fail_for_the_link_alone_and_training_is_unaffected() -> None:
    offline = _phone(network=NetworkState(kind="none"))
    policy = Policy(unmetered_for={"train", "upload"})

    assert decide(offline, policy, phase="upload", now=NOON).codes == ("network_down",)
    assert decide(offline, policy, phase="train", now=NOON).eligible
    down = _phone(network=replace(WIFI, link_up=False))
    assert str(decide(down, policy, phase="download", now=NOON)) == "not eligible: no network"


@pytest.mark.parametrize(
    ("sensor", "reading", "codes"),
    [
        # power is "charging OR battery": when both sides fail, both say why
        ("battery", {"battery_percent": None, "charging": False}, ("battery_unknown", "not_charging")),
        ("charging", {"battery_percent": 10.0, "charging": None}, ("battery_low", "charging_unknown")),
        ("cpu_load", {"cpu_load": None}, ("cpu_load_unknown",)),
        ("temperature", {"temperature_c": None}, ("temperature_unknown",)),
        ("memory", {"memory_available_bytes": None}, ("memory_unknown",)),
        ("disk", {"disk_free_bytes": None}, ("disk_unknown",)),
        ("metered", {"network": replace(WIFI, metered=None)}, ("metered_unknown",)),
        ("network", {"network": NetworkState(kind="unknown")}, ("network_unknown",)),
    ],
)
def test_an_unknown_reading_passes_or_fails_as_the_policy_says(
    sensor: str, reading: dict[str, Any], codes: tuple[str, ...]
) -> None:
    state = _phone(**reading)
    deny_one: dict[str, Any] = {sensor: "deny"}
    allow_all: dict[str, Any] = dict.fromkeys(UNKNOWN_SENSORS, "allow")
    deny = Policy(max_cpu_load=0.5, unknown=replace(Unknowns(), **deny_one))
    allow = Policy(max_cpu_load=0.5, unknown=Unknowns(**allow_all))
    phase = "download" if sensor in ("metered", "network") else "train"

    denied = decide(state, deny, phase=phase, now=NOON)
    allowed = decide(state, allow, phase=phase, now=NOON)

    assert denied.codes == codes
    assert f"{sensor.replace('_', ' ')} unknown (policy: deny)" in str(denied)
    assert allowed.eligible


def test_by_default_an_unknown_charging_state_only_matters_with_a_low_battery() -> None:
    low = decide(_phone(battery_percent=20.0, charging=None), Policy(), phase="train", now=NOON)

    assert str(low) == "not eligible: battery 20% < 50%, charging unknown (policy: deny)"
    assert decide(_phone(battery_percent=70.0, charging=None), Policy(), phase="train", now=NOON).eligible
    assert not decide(_pi(memory_available_bytes=None), Policy(), phase="train", now=NOON).eligible


def test_starting_to_train_needs_the_working_set_on_top_of_the_free_memory() -> None:
    state = _pi(memory_available_bytes=300 * MB)
    policy = Policy(min_free_memory_mb=128)

    start = decide(state, policy, phase="train", now=NOON, working_set_bytes=200 * MB)
    small = decide(state, policy, phase="train", now=NOON, working_set_bytes=150 * MB)

    assert str(start) == "not eligible: memory 300 MB available < 328 MB needed"
    assert start.codes == ("memory_low",)
    assert small.eligible


def test_training_in_progress_only_needs_the_free_memory_since_its_working_set_is_allocated() -> None:
    policy = Policy(min_free_memory_mb=128)

    assert decide(_pi(memory_available_bytes=130 * MB), policy, phase="continue", now=NOON).eligible
    squeezed = decide(_pi(memory_available_bytes=100 * MB), policy, phase="continue", now=NOON)
    assert str(squeezed) == "not eligible: memory 100 MB available < 128 MB needed"


def test_a_full_disk_blocks_downloads_but_not_uploads() -> None:
    state = _pi(disk_free_bytes=100 * MB)

    assert str(decide(state, Policy(), phase="download", now=NOON)) == "not eligible: disk 100 MB free < 256 MB"
    assert decide(state, Policy(), phase="upload", now=NOON).eligible


def test_the_idle_check_applies_before_training_and_never_during_it() -> None:
    state, policy = _pi(cpu_load=0.63), Policy(max_cpu_load=0.2)

    assert str(decide(state, policy, phase="train", now=NOON)) == "not eligible: cpu busy 63% > 20%"
    assert decide(state, policy, phase="continue", now=NOON).eligible


def test_overheating_stops_training_in_progress() -> None:
    decision = decide(_pi(temperature_c=74.5), Policy(), phase="continue", now=NOON)

    assert str(decision) == "not eligible: temperature 74.5 C > 70 C"


@pytest.mark.parametrize(
    ("hour", "minute", "eligible"),
    [
        (23, 0, True),
        (23, 59, True),
        (0, 0, True),
        (3, 30, True),
        (5, 59, True),
        (6, 0, False),
        (12, 0, False),
        (22, 59, False),
    ],
)
def test_a_nightly_window_crosses_midnight(hour: int, minute: int, eligible: bool) -> None:
    policy = Policy(windows=(Window.parse("23:00-06:00"),))

    decision = decide(_pi(), policy, phase="train", now=datetime(2024, 5, 1, hour, minute))

    assert decision.eligible is eligible
    assert eligible or decision.codes == ("outside_window",)


def test_the_window_text_lists_every_window_and_the_local_time() -> None:
    policy = Policy(windows=(Window.parse("01:00-05:00"), Window.parse("22:00-23:00")))

    decision = decide(_pi(), policy, phase="continue", now=NOON)

    assert str(decision) == "not eligible: outside windows 01:00-05:00, 22:00-23:00 (now 12:00)"


def test_windows_use_the_wall_clock_of_an_aware_time_and_by_default_spare_uploads() -> None:
    policy = Policy(windows=(Window.parse("23:00-06:00"),))
    night_in_tokyo = datetime(2024, 5, 1, 2, 0, tzinfo=timezone(timedelta(hours=9)))

    assert decide(_pi(), policy, phase="train", now=night_in_tokyo).eligible
    assert decide(_pi(), policy, phase="upload", now=NOON).eligible


@given(st.integers(0, 1439), st.integers(1, 1439), st.integers(0, 86_399))
def test_in_window_exactly_when_the_minutes_since_start_are_fewer_than_its_length(
    start: int, length: int, second: int
) -> None:
    policy = Policy(windows=(Window(start=start, end=(start + length) % 1440 or 1440),))
    now = datetime(2024, 5, 1) + timedelta(seconds=second)

    decision = decide(_pi(), policy, phase="train", now=now)

    assert decision.eligible is ((second - start * 60) % 86_400 < length * 60)


def test_three_a_week_for_phones_and_one_a_month_for_cameras() -> None:
    state, night = _phone(cpu_load=0.0, temperature_c=35.0), datetime(2024, 5, 1, 2, 0)
    once = [TAKEN_AT - 10 * DAY]
    thrice = [TAKEN_AT - 5 * DAY, TAKEN_AT - 3 * DAY, TAKEN_AT - 3600]

    phone = decide(state, _example("phone"), phase="train", now=night, history=once)
    camera = decide(state, _example("camera"), phase="train", now=night, history=once)
    phone_full = decide(state, _example("phone"), phase="train", now=night, history=thrice)

    assert phone.eligible
    assert str(camera) == "not eligible: budget: 1/1 rounds per month used, next in 20d"
    assert camera.codes == ("budget_exhausted",)
    assert str(phone_full) == "not eligible: budget: 3/3 rounds per week used, next in 2d"


@pytest.mark.parametrize(
    ("phase", "checked"), [("train", True), ("download", True), ("continue", False), ("upload", False)]
)
def test_the_budget_is_checked_before_a_round_starts_never_while_it_runs(phase: str, checked: bool) -> None:
    state, night = _phone(cpu_load=0.0, temperature_c=35.0), datetime(2024, 5, 1, 2, 0)

    decision = decide(state, _example("camera"), phase=phase, now=night, history=[TAKEN_AT - DAY])

    assert decision.codes == (("budget_exhausted",) if checked else ())


def test_every_failed_check_is_listed_with_a_known_code() -> None:
    state = _phone(
        battery_percent=10.0,
        charging=False,
        temperature_c=90.0,
        cpu_load=0.9,
        memory_available_bytes=MB,
        disk_free_bytes=MB,
        network=replace(WIFI, metered=True),
    )
    policy = replace(_example(), require_charging=False)

    decision = decide(state, policy, phase="train", now=NOON, history=[TAKEN_AT] * 3)

    assert set(decision.codes) == {
        "battery_low",
        "not_charging",
        "too_hot",
        "cpu_busy",
        "memory_low",
        "disk_low",
        "outside_window",
        "network_metered",
        "budget_exhausted",
    }
    assert set(decision.codes) <= set(REASON_CODES)
    assert {f"{s}_unknown" for s in UNKNOWN_SENSORS} <= set(REASON_CODES)


def test_decisions_serialise_for_the_server() -> None:
    decision = Decision(phase="upload", reasons=(Reason(code="network_metered", text="network metered"),))

    assert decision.as_dict() == {
        "phase": "upload",
        "eligible": False,
        "reasons": [{"code": "network_metered", "text": "network metered"}],
    }


def test_an_unknown_phase_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="phase"):
        decide(_pi(), Policy(), phase="train_now", now=NOON)
