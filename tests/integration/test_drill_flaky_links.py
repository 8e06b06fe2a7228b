"""Fault drill: real ``fedflock agent`` processes behind a fault-injecting TCP proxy (seeded plan:
drops after N bytes, UPDATEs cut mid-packet, delays, blackholes, muted PUBACKs). Every update is
accepted exactly once (read from the server's store). Full size: benchmarks/drills.py.
"""

from __future__ import annotations

import pytest

from edge_agent.runtime.bundle import Bundle
from fedflock.drills.flaky_links import flaky_links_drill
from fedflock.drills.plans import seeded_plan


@pytest.mark.timeout(150)
def test_updates_through_a_faulty_link_are_accepted_exactly_once(mosquitto, mlp_bundle: Bundle, tmp_path) -> None:
    report = flaky_links_drill(tmp_path, mosquitto, mlp_bundle, devices=3, rounds=2, seed=8)
    print(report.json_line())
    assert report.updates_issued == 6 and report.updates_accepted == 6
    assert report.lost == 0 and report.counted_twice == 0
    # faults really fired, not just planned (which ones depends on the order the agents connect in)
    assert report.faults >= 1, report.extra["fired"]
    assert report.reconnects >= 1  # at least one agent lost its link and came back


def test_the_seeded_plan_of_the_drill_mixes_fault_kinds() -> None:
    plan = seeded_plan(8, 12, trigger=b"/results", fault_rate=0.7)
    kinds = {fault.kind for fault in plan.faults if fault is not None}
    assert len(kinds) >= 3, kinds
    assert plan == seeded_plan(8, 12, trigger=b"/results", fault_rate=0.7)


@pytest.mark.timeout(150)
def test_tasks_sent_while_devices_reconnect_are_sent_again(mosquitto, mlp_bundle: Bundle, tmp_path) -> None:
    # every link is cut right after each round: the next round's TASKs meet reconnecting devices
    # and are lost unless the round engine sends them again (broker_server.task_resend)
    report = flaky_links_drill(tmp_path, mosquitto, mlp_bundle, devices=3, rounds=2, seed=8, cut_between_rounds=True)
    print(report.json_line())
    assert report.updates_issued == 6 and report.updates_accepted == 6
    assert report.lost == 0 and report.counted_twice == 0
