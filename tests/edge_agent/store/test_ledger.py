"""Participation history (the device's budget) and the facts table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.store import StoreConfig
from tests.edge_agent.store import DAY, HOUR, T0, Clock, open_store


def test_participations_are_recorded_once_per_task_and_listed_in_time_order(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock()) as store:
        assert store.record_participation("r2", T0 + 2 * HOUR) is True
        assert store.record_participation("r1", T0 + HOUR) is True
        assert store.record_participation("r2", T0 + 3 * HOUR) is False  # a restart mid-task counts once
        assert store.record_participation("r0", T0) is True

        assert store.participations(T0 + HOUR) == [T0 + HOUR, T0 + 2 * HOUR]
        assert store.participations(T0) == [T0, T0 + HOUR, T0 + 2 * HOUR]
        assert store.participations(T0 + DAY) == []


def test_participations_are_pruned_after_retention(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock(), StoreConfig(retention_s=DAY)) as store:
        store.record_participation("old", T0)
        store.record_participation("new", T0 + DAY)

        report = store.purge(T0 + DAY + 1)

        assert report.participations == 1
        assert store.participations(0.0) == [T0 + DAY]


def test_facts_are_replaced_and_survive_a_restart(tmp_path: Path) -> None:
    decision = json.dumps({"eligible": False, "reason": "battery 12% < 30%"})
    with open_store(tmp_path, Clock()) as store:
        assert store.get_fact("eligibility") is None
        store.put_fact("eligibility", '{"eligible": true}')
        store.put_fact("eligibility", decision)
        store.put_fact("other", "[1, 2]")
    with open_store(tmp_path, Clock()) as store:
        assert store.get_fact("eligibility") == decision
        assert store.get_fact("other") == "[1, 2]"


def test_a_fact_must_be_json(tmp_path: Path) -> None:
    with open_store(tmp_path, Clock()) as store:
        with pytest.raises(ValueError, match="fact 'k' is not valid JSON"):
            store.put_fact("k", "{not json")
        assert store.get_fact("k") is None
