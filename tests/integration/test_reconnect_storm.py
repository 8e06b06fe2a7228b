"""Reconnect storm at suite size: 100 simulated devices, Mosquitto restarted under them.

With full jitter the comeback spreads over the first backoff window, so no 0.25 s bucket should
hold much more than its share (100 devices × 0.25 s / 2 s ≈ 12.5); without jitter every device
retries at the same instant."""

from __future__ import annotations

from pathlib import Path

from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.backoff import ReconnectSettings
from fedflock.simulate.storm import run_storm

DEVICES, WINDOW_S, BUCKET_S = 100, 2.0, 0.25


def test_full_jitter_spreads_the_reconnect_storm_and_everyone_comes_back(digits_bundle: Bundle, tmp_path: Path) -> None:
    def storm(jitter: str, where: str):  # type: ignore[no-untyped-def]
        return run_storm(
            tmp_path / where,
            bundle=digits_bundle.directory,
            devices=DEVICES,
            processes=2,
            reconnect=ReconnectSettings(min_s=WINDOW_S, max_s=30.0, jitter=jitter),
            timeout_s=30.0,
            bucket_s=BUCKET_S,
        )

    jittered = storm("full", "full")
    assert jittered.reconnected >= DEVICES  # every device came back (a device may reconnect twice)
    assert jittered.time_to_99_s is not None and jittered.time_to_99_s < 4 * WINDOW_S
    fair_share_per_s = DEVICES / WINDOW_S  # uniform over the window
    assert jittered.peak_connects_per_s <= 2.5 * fair_share_per_s

    lockstep = storm("none", "none")
    assert lockstep.reconnected >= DEVICES
    assert lockstep.peak_attempts_per_s > 2.5 * fair_share_per_s  # the bound above is not trivially met
    assert lockstep.peak_attempts_per_s > jittered.peak_attempts_per_s
