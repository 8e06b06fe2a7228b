"""Fault drill: a real ``fedflock agent`` SIGKILLed between publishing its UPDATE and recording the
acknowledgement, twice per update, after the PUBACK (crash hook) and before it (muting proxy).

The server (real FederatedServer, SQLite store, real Mosquitto) must accept each update exactly
once; the verdict is read from its store (fedflock.drills.report). Full size: benchmarks/drills.py.
"""

from __future__ import annotations

import pytest

from edge_agent.runtime.bundle import Bundle
from fedflock.drills.agent_kill import agent_kill_drill


@pytest.mark.timeout(120)
def test_an_agent_killed_between_publish_and_ack_has_each_update_counted_once(
    mosquitto, mlp_bundle: Bundle, tmp_path
) -> None:
    report = agent_kill_drill(tmp_path, mosquitto, mlp_bundle, devices=1, rounds=2, kills=2)
    print(report.json_line())
    assert report.updates_issued == 2 and report.updates_accepted == 2
    assert report.lost == 0 and report.counted_twice == 0
    # 2 kills per update: the hook killed round 1's agent twice, round 2's once (+1 SIGKILL from the drill)
    assert report.faults == 4
    # round 1: attempts 2 and 3 re-sent; round 2: 2 and 3 as well
    assert report.retransmits == 4
    assert (
        report.duplicates_refused >= 2
    )  # round 1's re-sends, refused while round 2 ran (round 2's come after the end)
    assert report.extra["resent_accepted"] == 0  # the first copy was the one counted
