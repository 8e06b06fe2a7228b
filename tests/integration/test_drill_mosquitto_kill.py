"""Fault drill: Mosquitto SIGKILLed mid-round (after some updates were committed) and restarted
with ``persistence true`` on the same port; real ``fedflock agent`` processes, half of them
behind a slow link. Every device reconnects, the round completes, and the server's store holds
every update exactly once. Full size: benchmarks/drills.py.
"""

from __future__ import annotations

import pytest

from edge_agent.runtime.bundle import Bundle
from fedflock.drills.mosquitto_kill import mosquitto_kill_drill


@pytest.mark.timeout(150)
def test_mosquitto_killed_mid_round_loses_no_update_and_counts_none_twice(mlp_bundle: Bundle, tmp_path) -> None:
    report = mosquitto_kill_drill(tmp_path, mlp_bundle, devices=4, rounds=1, down_s=1.0)
    print(report.json_line())
    assert report.updates_issued == 4 and report.updates_accepted == 4
    assert report.lost == 0 and report.counted_twice == 0
    assert 1 <= report.extra["accepted_before_kill"][0] < 4  # the kill landed mid-round
    assert report.reconnects >= 4  # every agent lost its connection and came back
    assert (tmp_path / "mosquitto" / "db" / "mosquitto.db").is_file()  # persistence was on
