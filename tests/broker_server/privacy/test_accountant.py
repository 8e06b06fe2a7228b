"""The accountant: ε monotone in rounds and noise, the budget is never exceeded, state round-trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.privacy import BudgetExhausted, RdpAccountant, SampledGaussian, epsilon_for, epsilon_from_rdp

ORDERS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)  # coarse: fast, still a valid bound


def accountant(q: float = 0.1, z: float = 1.0, budget: float = 3.0) -> RdpAccountant:
    return RdpAccountant(
        SampledGaussian(sampling_rate=q, noise_multiplier=z), epsilon_budget=budget, delta=1e-5, orders=ORDERS
    )


@settings(max_examples=25, deadline=None)
@given(q=st.floats(0.001, 1.0), z=st.floats(0.5, 20.0), rounds=st.integers(1, 500))
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(q: float, z: float, rounds: int) -> None:
    mechanism = SampledGaussian(sampling_rate=q, noise_multiplier=z)
    noisier = SampledGaussian(sampling_rate=q, noise_multiplier=z * 1.25)
    eps = epsilon_for(mechanism, rounds, 1e-5, ORDERS)
    assert 0 < eps < epsilon_for(mechanism, rounds + 1, 1e-5, ORDERS)
    assert epsilon_for(noisier, rounds, 1e-5, ORDERS) < eps


@settings(max_examples=20, deadline=None)
@given(
    q=st.floats(0.01, 0.5),
    z=st.floats(0.6, 5.0),
    budget=st.floats(0.5, 10.0),
    attempts=st.lists(st.sampled_from([1.0, 0.5, 2.0]), min_size=1, max_size=60),
)
def test_budget_is_never_exceeded(q: float, z: float, budget: float, attempts: list[float]) -> None:
    acc = accountant(q, z, budget)
    for scale in attempts:  # rounds with varying noise, as a server whose z changes would run them
        mechanism = SampledGaussian(sampling_rate=q, noise_multiplier=z * scale)
        before = acc.spent()
        if acc.can_run(mechanism):
            assert acc.record(mechanism).epsilon <= budget
        else:
            with pytest.raises(BudgetExhausted):
                acc.record(mechanism)
            assert acc.spent() == before  # refused: nothing recorded
        assert acc.spent().epsilon <= budget


def test_can_run_refuses_exactly_the_round_that_would_exceed() -> None:
    acc = accountant(q=0.2, z=1.5, budget=4.0)
    fits = acc.remaining_rounds()
    assert fits > 1
    assert acc.epsilon(fits) <= 4.0 < acc.epsilon(fits + 1)
    for _ in range(fits):
        assert acc.can_run()
        acc.record()
    assert acc.rounds == fits and not acc.can_run() and acc.remaining_rounds() == 0
    with pytest.raises(BudgetExhausted, match=f"round {fits + 1}"):
        acc.record()
    assert acc.spent().epsilon == pytest.approx(acc.epsilon(fits))


def test_heterogeneous_rounds_compose_by_addition() -> None:
    acc = accountant(q=0.1, z=1.0, budget=100.0)
    other = SampledGaussian(sampling_rate=0.05, noise_multiplier=2.0)
    acc.record()
    acc.record(other)
    acc.record()
    assert acc.rounds == 3
    both = acc.mechanism.rdp(ORDERS) * 2 + other.rdp(ORDERS)
    assert acc.spent().epsilon == pytest.approx(epsilon_from_rdp(ORDERS, both, 1e-5)[0])
    assert acc.spent().epsilon > acc.epsilon(2)


def test_snapshot_round_trips_through_json() -> None:
    acc = accountant(budget=50.0)
    for _ in range(3):
        acc.record()
    acc.record(SampledGaussian(sampling_rate=0.3, noise_multiplier=2.0))
    copy = accountant(budget=50.0)
    copy.restore(json.loads(json.dumps(acc.snapshot())))
    assert copy.spent() == acc.spent() and copy.rounds == 4
    with pytest.raises(ValueError):
        copy.restore({"rounds": [[0.1, 1.0, 0]]})
    with pytest.raises(ValueError):
        copy.restore({})
    assert copy.spent() == acc.spent()  # a bad snapshot changed nothing


def test_no_rounds_spend_nothing_and_bad_arguments_are_rejected() -> None:
    acc = accountant()
    assert acc.spent().epsilon == 0.0 and acc.epsilon(0) == 0.0
    with pytest.raises(ValueError):
        SampledGaussian(sampling_rate=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError):
        SampledGaussian(sampling_rate=0.1, noise_multiplier=float("nan"))
    with pytest.raises(ValueError):
        RdpAccountant(acc.mechanism, epsilon_budget=0, delta=1e-5)
