"""Staged rollout: widening when healthy, halt/rollback on metric drops and install failures, pins,
stable proportional cohorts, and resuming from saved state."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.rollout import (
    Decision,
    EvalReport,
    InstallReport,
    Observation,
    RolloutPlan,
    RolloutState,
    Stage,
    cohort_bucket,
)
from edge_agent.errors import ConfigError

DEVICES = [f"dev-{i:04d}" for i in range(2000)]


def plan(**kw: Any) -> RolloutPlan:
    fields: dict[str, Any] = {
        "rollout_id": "r1",
        "version": 5,
        "baseline_version": 4,
        "max_metric_drop": 2.0,
        "max_install_failure_percent": 20.0,
        "min_install_reports": 5,
        "min_eval_reports": 3,
    }
    fields.update(kw)
    percents = fields.pop("percents", (5, 25, 50, 100))
    return RolloutPlan.staged(
        percents, min_devices=fields.pop("min_devices", 3), min_soak_s=fields.pop("soak", 60.0), **fields
    )


def cohort_reports(state: RolloutState, *, accuracy: float, ok: bool = True) -> list[Observation]:
    """Every device that should run the new version installs it and reports ``accuracy``."""
    out: list[Observation] = []
    for device in DEVICES:
        if state.target_version(device) == state.plan.version:
            out.append(InstallReport(device_id=device, version=state.plan.version, ok=ok))
            out.append(EvalReport(device_id=device, version=state.plan.version, metrics={"accuracy": accuracy}))
    return out


BASELINE = [EvalReport(device_id=d, version=4, metrics={"accuracy": 90.0}) for d in DEVICES[:10]]


# -- plan validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"percents": (5, 50)},  # does not reach 100
        {"percents": (50, 25, 100)},  # not increasing
        {"percents": (0, 100)},
        {"version": 4},
        {"rollout_id": ""},
        {"max_install_failure_percent": 100.0},
        {"max_metric_drop": float("nan")},
    ],
)
def test_bad_plans_are_refused(kw: dict) -> None:
    with pytest.raises(ConfigError):
        plan(**kw)


# -- state machine --------------------------------------------------------------------------------


def test_a_healthy_rollout_widens_stage_by_stage_after_soaking() -> None:
    state = RolloutState.start(plan(), now=0.0)
    state, decisions = state.step(BASELINE, now=1.0)
    assert decisions == [] and "soaked 1s of 60s" in state.blockers(1.0)
    percents = []
    now = 0.0
    for _ in range(4):
        now += 61.0
        state, decisions = state.step(cohort_reports(state, accuracy=89.5), now=now)
        percents.append(state.percent)
        assert len(decisions) == 1
    assert percents == [25, 50, 100, 100]
    assert state.status == "complete" and decisions[0].kind == "complete"
    assert all(state.target_version(d) == 5 for d in DEVICES[:50])
    # a terminal state ignores further observations
    assert state.step(cohort_reports(state, accuracy=0.0), now=now + 100)[1] == []


def test_no_advance_before_soak_or_without_enough_devices_or_evidence() -> None:
    state = RolloutState.start(plan(min_devices=1000), now=0.0)
    state, decisions = state.step([*BASELINE, *cohort_reports(state, accuracy=90.0)], now=500.0)
    assert decisions == [] and state.stage == 0
    assert any("need 1000" in b for b in state.blockers(500.0))
    no_baseline = RolloutState.start(plan(soak=0.0), now=0.0)
    no_baseline, decisions = no_baseline.step(cohort_reports(no_baseline, accuracy=90.0), now=1.0)
    assert decisions == [] and no_baseline.blockers(1.0) == ["no baseline accuracy yet"]


def test_a_metric_drop_in_the_canary_rolls_everyone_back() -> None:
    state = RolloutState.start(plan(), now=0.0)
    state, _ = state.step(BASELINE, now=1.0)
    state, decisions = state.step(cohort_reports(state, accuracy=87.5), now=2.0)
    assert [d.kind for d in decisions] == ["rollback"] and "worse by 2.5 > 2.0" in decisions[0].reason
    assert state.status == "rolled_back" and state.percent == 0
    assert {state.target_version(d) for d in DEVICES} == {4}


def test_lower_is_better_metrics_and_a_fixed_baseline() -> None:
    state = RolloutState.start(
        plan(metric="loss", higher_is_better=False, baseline_metric=0.5, max_metric_drop=0.1), now=0.0
    )
    reports = [EvalReport(device_id=d, version=5, metrics={"loss": 0.7}) for d in DEVICES[:3]]
    state, decisions = state.step(reports, now=1.0)
    assert state.status == "rolled_back" and decisions[0].kind == "rollback"


def test_install_failures_above_the_rate_halt_or_roll_back() -> None:
    fails = [InstallReport(device_id=d, version=5, ok=i < 7) for i, d in enumerate(DEVICES[:10])]  # 30 % failed
    rolled, decisions = RolloutState.start(plan(), now=0.0).step(fails, now=1.0)
    assert rolled.status == "rolled_back" and "3/10 installs of v5 failed" in decisions[0].reason
    halted, decisions = RolloutState.start(plan(on_install_failures="halt"), now=0.0).step(fails, now=1.0)
    assert halted.status == "halted" and decisions == [Decision(kind="halt", stage=0, reason=decisions[0].reason)]
    # a halted rollout never widens, keeps its canary, and a later rollback rule still fires
    assert halted.target_version(DEVICES[0]) in (4, 5) and halted.percent == 5
    halted, decisions = halted.step(BASELINE, now=10_000.0)
    assert decisions == [] and halted.stage == 0
    bad_eval = [EvalReport(device_id=d, version=5, metrics={"accuracy": 50.0}) for d in DEVICES[:3]]
    rolled, decisions = halted.step(bad_eval, now=10_001.0)
    assert rolled.status == "rolled_back" and [d.kind for d in decisions] == ["rollback"]


def test_too_few_install_reports_are_not_judged() -> None:
    fails = [InstallReport(device_id=d, version=5, ok=False) for d in DEVICES[:4]]
    state, decisions = RolloutState.start(plan(), now=0.0).step(fails, now=1.0)
    assert decisions == [] and state.status == "active"
    # the latest report per device counts: retries that succeed bring the rate down
    fixed = [InstallReport(device_id=d, version=5, ok=True) for d in DEVICES[:4]]
    state, decisions = state.step([*fixed, InstallReport(device_id=DEVICES[9], version=5, ok=False)], now=2.0)
    assert decisions == [] and state.status == "active"


def test_operator_resume_and_rollback() -> None:
    state = RolloutState.start(plan(on_install_failures="halt"), now=0.0)
    halted, _ = state.step([InstallReport(device_id=d, version=5, ok=False) for d in DEVICES[:5]], now=1.0)
    with pytest.raises(ValueError):
        state.resume(2.0)
    resumed = halted.resume(2.0)
    assert resumed.status == "active" and resumed.stage_started_at == 2.0
    assert resumed.rollback("operator").target_version(DEVICES[0]) == 4


def test_pinned_classes_run_their_version_whatever_the_stage() -> None:
    state = RolloutState.start(plan(pins={"low_ram": 3, "beta": 5}), now=0.0)
    outside = next(d for d in DEVICES if state.target_version(d) == 4)
    assert state.target_version(outside, "beta") == 5
    assert state.target_version(outside, "low_ram") == 3
    assert state.target_version(outside, "phone") == 4
    rolled = state.rollback("test")
    assert rolled.target_version(outside, "beta") == 5 and rolled.target_version(outside, "phone") == 4


# -- cohorts --------------------------------------------------------------------------------------


def test_cohort_assignment_is_stable_nested_and_depends_on_the_rollout_id() -> None:
    p = plan()
    assert [p.cohort(d) for d in DEVICES[:100]] == [plan().cohort(d) for d in DEVICES[:100]]
    other = plan(rollout_id="r2")
    assert [p.cohort(d) for d in DEVICES[:100]] != [other.cohort(d) for d in DEVICES[:100]]
    state = RolloutState.start(p, now=0.0)
    previous: set[str] = set()
    for stage in range(len(p.stages)):
        running = {d for d in DEVICES if RolloutState(plan=p, stage=stage, stage_started_at=0).target_version(d) == 5}
        assert previous <= running
        previous = running
    assert previous == set(DEVICES) and state.stage == 0


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=12), st.floats(1.0, 99.0))
def test_cohorts_are_proportional(rollout_id: str, percent: float) -> None:
    p = RolloutPlan(
        rollout_id=rollout_id, version=2, baseline_version=1, stages=(Stage(percent=percent), Stage(percent=100))
    )
    share = 100 * sum(1 for d in DEVICES if p.cohort(d) == 0) / len(DEVICES)
    # binomial sd at n=2000 is at most 1.12 points: 5 sd
    assert abs(share - percent) < 5.6
    assert all(0 <= cohort_bucket(rollout_id, d) < 100 for d in DEVICES[:50])


# -- persistence ----------------------------------------------------------------------------------

observation = st.one_of(
    st.builds(
        InstallReport, device_id=st.sampled_from(DEVICES[:40]), version=st.sampled_from([4, 5]), ok=st.booleans()
    ),
    st.builds(
        EvalReport,
        device_id=st.sampled_from(DEVICES[:40]),
        version=st.sampled_from([4, 5]),
        metrics=st.fixed_dictionaries({"accuracy": st.floats(80, 95)}),
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(observation, max_size=8), st.floats(0, 50)), max_size=12), st.data())
def test_resuming_from_saved_state_equals_an_uninterrupted_run(
    batches: list[tuple[list[Observation], float]], data: st.DataObject
) -> None:
    p = plan(percents=(10, 50, 100), soak=30.0, min_devices=2, min_install_reports=4, min_eval_reports=2, pins={"x": 3})
    cut = data.draw(st.integers(0, len(batches)))
    straight = RolloutState.start(p, now=0.0)
    resumed = RolloutState.start(p, now=0.0)
    straight_decisions: list[Decision] = []
    resumed_decisions: list[Decision] = []
    now = 0.0
    for i, (batch, dt) in enumerate(batches):
        now += dt
        if i == cut:
            resumed = RolloutState.from_json(json.loads(json.dumps(resumed.to_json())))
        straight, d1 = straight.step(batch, now)
        resumed, d2 = resumed.step(batch, now)
        straight_decisions += d1
        resumed_decisions += d2
    assert RolloutState.from_json(json.loads(json.dumps(resumed.to_json()))) == straight == resumed
    assert resumed_decisions == straight_decisions


def test_bad_saved_state_is_refused() -> None:
    saved = RolloutState.start(plan(), now=0.0).to_json()
    with pytest.raises(ValueError):
        RolloutState.from_json({**saved, "status": "exploded"})
    with pytest.raises(ValueError):
        RolloutState.from_json({**saved, "stage": 9})
