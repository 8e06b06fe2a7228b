"""Selection for synchronous rounds: over-selection, stratification, budgets, determinism, and how
a round ends (including late updates handed to FedBuff)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_server.fedbuff import Accepted, FedBuff, FedBuffConfig, Rejected
from broker_server.registry import DeviceRecord
from broker_server.rounds import RoundState
from broker_server.selection import (
    Abandon,
    Complete,
    Dropped,
    ParticipationHistory,
    SelectionPolicy,
    Wait,
    allocate,
    round_outcome,
    route_late_update,
    select,
)
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ConfigError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage


@dataclass(frozen=True)
class Device:
    device_id: str
    device_class: str = "phone"
    declines: bool = False


def fleet(sizes: dict[str, int]) -> list[Device]:
    return [Device(f"{cls}-{i}", cls) for cls, n in sizes.items() for i in range(n)]


def klass(device: Device) -> str:
    return device.device_class


# -- policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"k": 3, "fraction": 0.5}, {"k": 0}, {"fraction": 0.0}, {"fraction": 1.5}, {"k": 2, "over_selection": 0.9}],
)
def test_bad_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SelectionPolicy(**kwargs)


@given(st.integers(1, 200), st.sampled_from([1.0, 1.1, 1.2, 1.3, 1.5, 2.0]), st.integers(0, 400))
def test_over_selection_picks_ceil_factor_k_when_enough_devices(k: int, factor: float, population: int) -> None:
    policy = SelectionPolicy(k=k, over_selection=factor)
    selection = select([Device(f"d{i}") for i in range(population)], policy, rng=random.Random(0))
    # exact decimal arithmetic: 1.1 × 10 is 11 devices, not 12
    expected = -(-k * round(factor * 10) // 10)
    assert len(selection.chosen) == min(population, expected)
    assert len(set(selection.chosen)) == len(selection.chosen) and selection.wanted == k


def test_fraction_is_of_the_eligible_devices_rounded_up() -> None:
    devices = [Device(f"d{i}", declines=i < 5) for i in range(25)]
    selection = select(devices, SelectionPolicy(fraction=0.1, over_selection=1.5), rng=random.Random(1))
    assert (selection.eligible, selection.wanted, len(selection.chosen)) == (20, 2, 3)


def test_declined_devices_are_never_chosen_and_say_why() -> None:
    devices = [Device(f"d{i}", declines=i % 3 == 0) for i in range(30)]
    for seed in range(20):
        selection = select(devices, SelectionPolicy(k=30), rng=random.Random(seed))
        assert not {d.device_id for d in devices if d.declines} & set(selection.chosen)
        assert len(selection.chosen) == 20
    assert selection.excluded == {d.device_id: "declined" for d in devices if d.declines}


def test_registry_records_fit_and_their_reported_decline_is_honoured() -> None:
    def record(device_id: str, eligibility: dict) -> DeviceRecord:
        return DeviceRecord(
            device_id=device_id,
            online=True,
            bundle_digest="x",
            num_examples=1,
            agent_version="1",
            last_seen=0.0,
            eligibility=eligibility,
        )

    records = [record("a", {"eligible": False, "phase": "train"}), record("b", {"eligible": False, "phase": "upload"})]
    selection = select(records, SelectionPolicy(k=2), rng=random.Random(0))
    assert selection.chosen == ("b",) and selection.excluded == {"a": "declined"}


def test_selection_is_deterministic_given_the_rng_and_independent_of_candidate_order() -> None:
    devices = fleet({"phone": 40, "tablet": 15, "pi": 5})
    policy = SelectionPolicy(k=10, over_selection=1.3, stratify=True)
    first = select(devices, policy, rng=random.Random(42), device_class_of=klass)
    shuffled = devices[:]
    random.Random(3).shuffle(shuffled)
    again = select(shuffled, policy, rng=random.Random(42), device_class_of=klass)
    assert first == again
    other = select(devices, policy, rng=random.Random(43), device_class_of=klass)
    assert other.chosen != first.chosen


def test_duplicate_candidates_and_stratifying_without_classes_are_errors() -> None:
    with pytest.raises(ValueError, match="twice"):
        select([Device("a"), Device("a")], SelectionPolicy(k=1), rng=random.Random(0))
    with pytest.raises(ConfigError, match="device_class_of"):
        select([Device("a")], SelectionPolicy(k=1, stratify=True), rng=random.Random(0))


# -- stratification -------------------------------------------------------------------------------


def test_stratified_selection_is_proportional_with_one_per_class() -> None:
    devices = fleet({"phone": 70, "tablet": 25, "pi": 5})
    selection = select(devices, SelectionPolicy(k=20, stratify=True), rng=random.Random(0), device_class_of=klass)
    assert selection.allocation == {"phone": 14, "tablet": 5, "pi": 1}
    chosen_classes = [d.device_class for d in devices if d.device_id in selection.chosen]
    assert {c: chosen_classes.count(c) for c in set(chosen_classes)} == selection.allocation
    # a tiny class still gets one device when the target allows it
    small = select(
        fleet({"phone": 98, "pi": 2}), SelectionPolicy(k=5, stratify=True), rng=random.Random(0), device_class_of=klass
    )
    assert small.allocation == {"phone": 4, "pi": 1}


@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 60), min_size=1).filter(lambda d: sum(d.values()) > 0),
    st.data(),
)
def test_allocation_invariants(sizes: dict[str, int], data: st.DataObject) -> None:
    population = sum(sizes.values())
    total = data.draw(st.integers(0, population))
    alloc = allocate(sizes, total)
    assert sum(alloc.values()) == total
    assert all(0 <= alloc[c] <= sizes[c] for c in sizes)
    present = [c for c in sizes if sizes[c]]
    if total >= len(present):
        assert all(alloc[c] >= 1 for c in present)
    quotas = {c: total * sizes[c] / population for c in sizes}
    if all(q >= 1 for c, q in quotas.items() if sizes[c]) or total < len(present):
        # no one-per-class correction: plain largest remainder, within one of each quota
        assert all(abs(alloc[c] - quotas[c]) < 1 for c in sizes)
    assert allocate(sizes, total) == alloc


def test_allocate_refuses_impossible_totals() -> None:
    with pytest.raises(ValueError):
        allocate({"a": 2}, 3)


# -- participation budget -------------------------------------------------------------------------


def test_budget_excludes_devices_that_used_their_rounds_in_the_window() -> None:
    history = ParticipationHistory()
    devices = [Device(f"d{i}") for i in range(6)]
    policy = SelectionPolicy(k=3, max_rounds_per_window=2)
    rng = random.Random(0)
    for number in range(1, 13):
        counts = history.counts(number, window=4)
        selection = select(devices, policy, rng=rng, participation=counts)
        for device_id in selection.chosen:
            assert counts.get(device_id, 0) < 2, "over budget"
        assert {d for d, why in selection.excluded.items() if why == "over_budget"} == {
            d for d, n in counts.items() if n >= 2
        }
        history.record(number, selection.chosen)
    # every window of 4 rounds holds at most 2 participations per device
    for device_id, rounds in history.rounds.items():
        for start in range(1, 13):
            assert sum(1 for r in rounds if start <= r < start + 4) <= 2, device_id


def test_participation_history_round_trips_and_forgets() -> None:
    history = ParticipationHistory()
    history.record(1, ["a", "b"])
    history.record(1, ["a"])  # recorded once per round
    history.record(3, ["a"])
    assert history.counts(4, window=3) == {"a": 2, "b": 1}
    assert history.counts(4, window=1) == {"a": 1}
    assert ParticipationHistory.from_json(history.to_json()) == history
    history.forget_before(2)
    assert history.rounds == {"a": [3]}


# -- round outcome --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reports", "outstanding", "deadline_passed", "expected"),
    [
        (10, 3, False, Complete(reports=10, early=True)),  # k reports: stragglers not awaited
        (12, 0, False, Complete(reports=12, early=False)),
        (6, 4, False, Wait()),
        (6, 4, True, Complete(reports=6, early=True)),
        (6, 0, False, Complete(reports=6, early=False)),
        (2, 4, True, Abandon(reason="2 updates by the deadline, need 5")),
        (2, 0, False, Abandon(reason="2 updates from every selected device, need 5")),
    ],
)
def test_round_outcome(reports: int, outstanding: int, deadline_passed: bool, expected: object) -> None:
    outcome = round_outcome(reports, wanted=10, min_reports=5, outstanding=outstanding, deadline_passed=deadline_passed)
    assert outcome == expected


SPECS = (TensorSpec(name="w", shape=(2,), dtype="float32", role="parameter", trainable=True, aggregate=True),)


def late(device: str, task: str, **kw) -> UpdateMessage:
    payload = encode_update({"w": np.ones(2, np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0))
    fields: dict[str, Any] = {"round": 3, "model_version": 2, "num_examples": 5, "payload": payload}
    fields.update(kw)
    return UpdateMessage(device_id=device, task_id=task, **fields)


def test_late_updates_are_dropped_or_handed_to_fedbuff_but_never_counted_twice() -> None:
    closed = RoundState(round=3, model_version=2, tasks={"t1": "d1", "t2": "d2", "t3": "d3"}, specs=SPECS)
    assert closed.accept_update(late("d1", "t1"))
    buf = FedBuff(FedBuffConfig(buffer_size=5), SPECS, version=3)
    straggler = late("d2", "t2")
    assert isinstance(route_late_update(straggler, closed, policy="drop", buffer=buf), Dropped)
    routed = route_late_update(straggler, closed, policy="async", buffer=buf)
    assert isinstance(routed, Accepted) and routed.staleness == 1 and buf.pending == 1
    again = route_late_update(late("d2", "t2", attempt=2), closed, policy="async", buffer=buf)
    assert isinstance(again, Rejected) and again.reason == "duplicate"
    for bad, why in [
        (late("d1", "t1"), "already counted"),
        (late("d1", "t3"), "not issued"),
        (late("d3", "t3", round=2), "round 2"),
    ]:
        outcome = route_late_update(bad, closed, policy="async", buffer=buf)
        assert isinstance(outcome, Dropped) and why in outcome.reason
    assert buf.pending == 1
    with pytest.raises(ConfigError):
        route_late_update(late("d3", "t3"), closed, policy="async")


def test_target_math_matches_ceil_for_decimal_factors() -> None:
    for k in range(1, 50):
        assert SelectionPolicy(k=k, over_selection=1.1).target(1000) == math.ceil(k * 11 / 10)
