"""Fault drill: the device's filesystem (a 4 MiB tmpfs holding its state) fills up while it
trains. Storing the result fails with StorageFull naming the file, the store stays intact (PRAGMA
integrity_check ok, the task still pending, no half-written result), and once space returns a
restarted agent trains again and delivers: the server counts the update exactly once.
Full size: benchmarks/drills.py.
"""

from __future__ import annotations

import pytest

from edge_agent.runtime.bundle import Bundle
from fedflock.drills.disk_full import disk_full_drill


@pytest.mark.timeout(120)
def test_a_full_disk_gives_a_clear_error_keeps_the_store_and_delivers_once_space_returns(
    mosquitto, mlp_bundle: Bundle, tmp_path
) -> None:
    report, outcome = disk_full_drill(tmp_path, mosquitto, mlp_bundle, repeats=1)
    print(report.json_line())
    print(outcome)
    assert outcome.error_types[0] == "StorageFull", outcome
    assert "device storage full: could not store the result in" in outcome.messages[0], outcome
    assert str(tmp_path / "disk" / "state" / "agent.db") in outcome.messages[0]
    assert outcome.integrity == ("ok",)
    assert outcome.pending_while_full == (1,) and outcome.results_while_full == (0,)
    assert report.updates_issued == 1 and report.updates_accepted == 1
    assert report.lost == 0 and report.counted_twice == 0
