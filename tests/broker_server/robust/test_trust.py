"""Tiered trust: persistent outliers are quarantined with a reason, honest non-IID devices are not,
quarantined devices are released after probation, and the state survives JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.robust import Observation, Reputation, TrustConfig, TrustDecision, coordinate_median, observe_rows

D = 100
DEVICES = [f"d{i}" for i in range(10)]
ATTACKER = "d0"
WIDE = "d9"  # an honest device whose data is twice as non-IID as the others'


class Fleet:
    """Honest updates = shared direction + a persistent per-device bias (non-IID) + round noise."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.base = self.rng.normal(size=D)
        self.bias = {d: self.rng.normal(size=D) * (1.0 if d == WIDE else 0.5) for d in DEVICES}

    def round(self, attack: str | None) -> dict[str, np.ndarray]:
        shared = self.base + 0.2 * self.rng.normal(size=D)
        updates = {d: shared + self.bias[d] + 0.3 * self.rng.normal(size=D) for d in DEVICES}
        if attack == "huge":
            updates[ATTACKER] = 1e3 * self.rng.choice([-1.0, 1.0], size=D)
        elif attack == "sign-flip":
            updates[ATTACKER] = -3.0 * shared
        return {d: u.astype(np.float32) for d, u in updates.items()}


def play(
    reputation: Reputation, fleet: Fleet, rounds: range, attack: str | None, *, shadow: bool = True
) -> list[TrustDecision]:
    """Each round: median over trusted devices, observations for everyone taking part."""
    decisions: list[TrustDecision] = []
    for number in rounds:
        updates = fleet.round(attack)
        taking_part = [d for d in DEVICES if shadow or not reputation.is_quarantined(d)]
        trusted = [d for d in taking_part if not reputation.is_quarantined(d)]
        aggregate = coordinate_median(np.stack([updates[d] for d in trusted])).delta
        rows = np.stack([updates[d] for d in taking_part])
        decisions += reputation.update(number, observe_rows(rows, aggregate, taking_part))
    return decisions


def of(decisions: list[TrustDecision], device: str, action: str | None = None) -> list[TrustDecision]:
    return [x for x in decisions if x.device_id == device and (action is None or x.action == action)]


@pytest.mark.parametrize("attack", ["huge", "sign-flip"])
def test_a_persistent_outlier_is_quarantined_and_honest_non_iid_devices_are_not(attack: str) -> None:
    reputation = Reputation()
    decisions = play(reputation, Fleet(), range(1, 31), attack)
    attacker = of(decisions, ATTACKER)
    assert [(x.round, x.action) for x in attacker[:3]] == [(1, "outlier"), (2, "outlier"), (3, "quarantine")]
    assert re.fullmatch(
        r"quarantined: distance to aggregate \d+\.\dσ above the round median.* 3 rounds in a row", attacker[2].reason
    ), attacker[2].reason
    if attack == "sign-flip":
        assert "cosine to aggregate -" in attacker[2].reason
    assert {x.action for x in attacker[3:]} == {"extend"}  # still attacking while observed: never released
    assert reputation.quarantined == (ATTACKER,) and reputation.multiplier(ATTACKER) == 0.0
    assert not [x for x in decisions if x.device_id != ATTACKER]  # not even one outlier round
    for device in DEVICES[1:]:
        assert reputation.multiplier(device) > 0.95, device
    assert reputation.status(WIDE).strikes == 0


def test_without_the_spread_floor_the_more_non_iid_honest_device_would_be_quarantined() -> None:
    # Distances of 100-d updates concentrate (MAD ~ 0.3 around a median of ~5.6), so the honest
    # device at 1.9x the median sits many MADs out: the min_spread floor is what keeps it in.
    reputation = Reputation(TrustConfig(min_spread=0.0))
    decisions = play(reputation, Fleet(), range(1, 6), "huge")
    assert of(decisions, WIDE, "quarantine")
    assert reputation.is_quarantined(WIDE)


def test_release_after_probation_and_a_longer_one_for_a_repeat_offender() -> None:
    config = TrustConfig(probation_rounds=4)
    reputation, fleet = Reputation(config), Fleet(1)
    decisions = play(reputation, fleet, range(1, 4), "huge")
    assert of(decisions, ATTACKER, "quarantine")[0].round == 3
    decisions = play(reputation, fleet, range(4, 7), None)
    assert reputation.is_quarantined(ATTACKER) and not of(decisions, ATTACKER)  # 3 clean rounds: not yet
    decisions = play(reputation, fleet, range(7, 8), None)
    (release,) = of(decisions, ATTACKER)
    assert release.action == "release" and release.round == 7
    assert release.reason.startswith("released: 4 rounds without an outlier since 'quarantined: distance")
    assert reputation.multiplier(ATTACKER) == config.release_score
    decisions = play(reputation, fleet, range(8, 11), "huge")  # relapse: released on a short leash
    (again,) = of(decisions, ATTACKER, "quarantine")
    assert again.round == 9 and again.reason.startswith("quarantined: trust score 0.15 below 0.20 (distance")
    decisions = play(reputation, fleet, range(11, 18), None)
    assert not of(decisions, ATTACKER, "release")  # second strike: 8 clean rounds after the extension at 10
    decisions = play(reputation, fleet, range(18, 19), None)
    assert [x.action for x in of(decisions, ATTACKER)] == ["release"]
    assert reputation.status(ATTACKER).strikes == 2


def test_misbehaving_during_quarantine_restarts_probation() -> None:
    reputation, fleet = Reputation(TrustConfig(probation_rounds=3)), Fleet(2)
    play(reputation, fleet, range(1, 4), "huge")
    play(reputation, fleet, range(4, 6), None)
    decisions = play(reputation, fleet, range(6, 7), "huge")
    assert [x.action for x in of(decisions, ATTACKER)] == ["extend"]
    decisions = play(reputation, fleet, range(7, 9), None)
    assert not of(decisions, ATTACKER, "release")  # 2 clean rounds since round 6
    decisions = play(reputation, fleet, range(9, 10), None)
    assert of(decisions, ATTACKER, "release")[0].round == 9


def test_an_unobserved_quarantined_device_is_released_by_time() -> None:
    reputation, fleet = Reputation(), Fleet(3)
    play(reputation, fleet, range(1, 4), "huge")
    decisions = play(reputation, fleet, range(4, 9), "huge", shadow=False)  # excluded: its updates never seen
    assert [(x.round, x.action) for x in of(decisions, ATTACKER)] == [(8, "release")]


def test_failed_validations_quarantine_and_graded_ones_weight() -> None:
    reputation = Reputation()
    decisions: list[TrustDecision] = []
    for number in range(1, 11):
        observations = {d: Observation(validation=1.0) for d in DEVICES}
        observations["d1"] = Observation(validation=0.0)
        observations["d2"] = Observation(validation=0.6)
        decisions += reputation.update(number, observations)
    (quarantine,) = of(decisions, "d1", "quarantine")
    assert quarantine.round == 3
    assert quarantine.reason == "quarantined: validation 0.00 below 0.50 3 rounds in a row"
    assert reputation.multiplier("d2") == pytest.approx(0.6, abs=0.02)
    assert reputation.multiplier("d3") == pytest.approx(1.0, abs=0.02)


def test_small_rounds_skip_the_distance_test_but_not_the_cosine() -> None:
    reputation = Reputation()
    far = {"a": Observation(distance=1.0, cosine=0.9), "b": Observation(distance=1.1, cosine=0.9)}
    far["c"] = Observation(distance=1e9, cosine=0.5)
    assert reputation.update(1, far) == []  # 3 devices < min_round_size: no median to compare with
    far["c"] = Observation(distance=1e9, cosine=-0.5)
    (decision,) = reputation.update(2, far)
    assert decision.reason == "outlier round 1 of 3: cosine to aggregate -0.50 below 0.00"


def test_state_round_trips_through_json_and_rounds_must_advance() -> None:
    reputation, fleet = Reputation(), Fleet(4)
    play(reputation, fleet, range(1, 6), "sign-flip")
    restored = Reputation.from_state(json.loads(json.dumps(reputation.to_state())))
    assert restored.to_state() == reputation.to_state()
    for device in DEVICES:
        assert restored.status(device) == reputation.status(device)
    fleet_a, fleet_b = Fleet(5), Fleet(5)
    assert play(reputation, fleet_a, range(6, 10), None) == play(restored, fleet_b, range(6, 10), None)
    with pytest.raises(ValueError, match="not after"):
        restored.update(9, {})
    with pytest.raises(ValueError, match="version"):
        Reputation.from_state({**reputation.to_state(), "version": 99})
    with pytest.raises(ValueError, match="score"):
        state = reputation.to_state()
        state["devices"]["d1"]["score"] = 7.0
        Reputation.from_state(state)


def test_observations_must_be_numbers_in_range() -> None:
    for bad in ({"distance": float("nan")}, {"distance": float("inf")}, {"cosine": 1.5}, {"validation": -0.1}):
        with pytest.raises(ValueError, match="must be"):
            Observation(**bad)


def test_new_devices_start_on_the_lowest_tier() -> None:
    reputation = Reputation(TrustConfig(initial_score=0.4))
    assert reputation.multiplier("never-seen") == 0.4 and not reputation.is_quarantined("never-seen")
    with pytest.raises(ValueError, match="quarantine_below"):
        TrustConfig(quarantine_below=0.5, initial_score=0.5)


observation = st.builds(
    Observation,
    distance=st.none() | st.floats(0, 1e6),
    cosine=st.none() | st.floats(-1, 1),
    validation=st.none() | st.floats(0, 1),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(DEVICES[:6]), observation, max_size=6), min_size=1, max_size=25))
def test_multipliers_stay_in_0_1_and_quarantine_means_zero(rounds: list[dict[str, Observation]]) -> None:
    config = TrustConfig(probation_rounds=2)
    reputation = Reputation(config)
    quarantined_at: dict[str, int] = {}
    for number, observations in enumerate(rounds, start=1):
        for decision in reputation.update(number, observations):
            assert decision.reason
            if decision.action == "quarantine":
                quarantined_at[decision.device_id] = number
            elif decision.action == "release":
                assert number - quarantined_at.pop(decision.device_id) >= config.probation_rounds
        for device in DEVICES:
            value = reputation.multiplier(device)
            assert 0.0 <= value <= 1.0
            if reputation.is_quarantined(device):
                assert value == 0.0
            else:  # a score below the threshold quarantines at once
                assert value >= config.quarantine_below
            assert reputation.is_quarantined(device) == (device in quarantined_at)
