"""Robust rules: Byzantine resistance, exact special cases, invariances, and bounded-memory blocking."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from broker_server.robust import (
    ClippedMean,
    Krum,
    Median,
    NotEnoughUpdates,
    RowRule,
    RuleResult,
    TrimmedMean,
    coordinate_median,
    krum,
    trimmed_mean,
)
from broker_server.robust.rules import pairwise_sq_distances
from broker_server.robust.trust import observe_rows

N, F, D = 10, 3, 32
Rule = Callable[[np.ndarray, np.ndarray], RuleResult]
RULES: dict[str, Rule] = {
    "median": lambda x, w: coordinate_median(x, w),
    "weighted-median": lambda x, w: coordinate_median(x, w, weighted=True),
    "trimmed-mean": lambda x, w: trimmed_mean(x, w, beta=0.3),
    "krum": lambda x, w: krum(x, w, f=F),
    "multi-krum": lambda x, w: krum(x, w, f=F, m=4),
}


def honest_and_byzantine(attack: str, seed: int = 0) -> np.ndarray:
    """Rows 0..F-1 are Byzantine, the rest honest: a shared direction plus device noise."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D)
    rows = direction + 0.1 * rng.normal(size=(N, D))
    if attack == "huge":
        rows[:F] = 1e6 * rng.choice([-1.0, 1.0], size=(F, D))
    elif attack == "sign-flip":
        rows[:F] = -10.0 * direction + 0.1 * rng.normal(size=(F, D))
    else:  # colluding: all Byzantine rows send the same far point
        rows[:F] = 50.0
    return rows.astype(np.float32)


@pytest.mark.parametrize("attack", ["huge", "sign-flip", "colluding"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_robust_rules_stay_with_the_honest_updates_while_the_mean_is_ruined(name: str, attack: str) -> None:
    rows = honest_and_byzantine(attack)
    honest = rows[F:].astype(np.float64)
    honest_mean = honest.mean(axis=0)
    radius = float(np.linalg.norm(honest - honest_mean, axis=1).max())  # honest spread, ~0.1 * sqrt(D)
    result = RULES[name](rows, np.full(N, 5.0))
    # coordinate-wise: every coordinate lies within the honest values' range
    assert (result.delta >= honest.min(axis=0) - 1e-6).all() and (result.delta <= honest.max(axis=0) + 1e-6).all()
    assert np.linalg.norm(result.delta - honest_mean) <= radius
    assert np.linalg.norm(rows.astype(np.float64).mean(axis=0) - honest_mean) > 10 * radius
    if "krum" in name:
        assert set(result.report.selected) <= set(range(F, N))  # only honest rows picked


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    rows = np.zeros((8, 3), np.float32)
    with pytest.raises(NotEnoughUpdates, match=r"f=3 needs n > 2f \+ 2 = 8 updates, got 8") as info:
        krum(rows, f=3)
    assert info.value.code == "not_enough_updates"
    assert krum(np.zeros((9, 3), np.float32), f=3).report.selected == (0,)
    with pytest.raises(NotEnoughUpdates, match="m=10"):
        Krum(f=0, m=10).apply(rows)
    assert Krum(f=3, m=2).min_updates == 9
    with pytest.raises(ValueError, match="f must be"):
        Krum(f=-1)


def test_trimmed_mean_always_keeps_a_value() -> None:
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(beta=0.5)
    for n in range(1, 12):  # beta < 0.5 keeps n - 2 * floor(beta * n) >= 1 values
        rows = np.arange(n, dtype=np.float32)[:, None]
        result = trimmed_mean(rows, beta=0.49)
        assert result.report.trimmed_each_side == int(0.49 * n)
        assert result.delta[0] == np.median(rows)


def test_trimmed_mean_drops_k_values_at_each_end_per_coordinate() -> None:
    rows = np.array([[1.0, 100.0], [2.0, -100.0], [3.0, 5.0], [4.0, 6.0], [1000.0, 7.0]], np.float32)
    np.testing.assert_allclose(trimmed_mean(rows, beta=0.2).delta, [3.0, 6.0])  # k = 1
    weights = np.array([1.0, 1.0, 1.0, 3.0, 1.0])
    np.testing.assert_allclose(
        trimmed_mean(rows, weights, beta=0.2, weighted=True).delta, [17 / 5, 30 / 5]
    )  # (2+3+3*4)/5, (5+3*6+7)/5


def test_weighted_median_follows_the_weights() -> None:
    rows = np.array([[1.0], [2.0], [3.0], [10.0]], np.float32)
    assert coordinate_median(rows, np.array([1.0, 1.0, 1.0, 5.0]), weighted=True).delta[0] == 10.0
    assert coordinate_median(rows, np.array([3.0, 1.0, 1.0, 1.0]), weighted=True).delta[0] == 1.5  # 3 of 6 = half
    assert coordinate_median(rows, np.array([4.0, 1.0, 1.0, 1.0]), weighted=True).delta[0] == 1.0
    assert coordinate_median(rows, np.full(4, 0.1), weighted=True).delta[0] == 2.5  # equal weights = np.median


def test_multi_krum_with_f0_and_m_n_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(7, 20)).astype(np.float32)
    weights = rng.uniform(1, 100, size=7)
    result = krum(rows, weights, f=0, m=7, weighted=True)
    np.testing.assert_allclose(result.delta, np.average(rows, axis=0, weights=weights), rtol=1e-5, atol=1e-6)
    assert sorted(result.report.selected) == list(range(7))
    np.testing.assert_allclose(krum(rows, weights, f=0, m=7).delta, rows.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_krum_distances_of_honest_rows_survive_enormous_rows() -> None:
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(9, 50)).astype(np.float32)
    rows[:4] = 1e20  # squares ~1e40: an uncentred Gram matrix would lose the honest distances entirely
    got = pairwise_sq_distances(rows, work_bytes=2048)
    honest = rows[4:].astype(np.float64)
    want = ((honest[:, None, :] - honest[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(got[4:, 4:], want, rtol=1e-9, atol=1e-9)


# --- properties -------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
matrices = st.integers(3, 9).flatmap(
    lambda n: st.integers(1, 12).flatmap(lambda d: arrays(np.float32, (n, d), elements=finite))
)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 30), elements=finite), st.integers(1, 9))
def test_median_of_identical_rows_is_the_row(row: np.ndarray, n: int) -> None:
    rows = np.tile(row, (n, 1))
    np.testing.assert_array_equal(coordinate_median(rows).delta, row)
    np.testing.assert_array_equal(coordinate_median(rows, np.arange(1.0, n + 1), weighted=True).delta, row)
    np.testing.assert_array_equal(trimmed_mean(rows, beta=0.3).delta, row)


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_trimmed_mean_with_beta_zero_is_the_mean(rows: np.ndarray) -> None:
    want = rows.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(rows, beta=0.0).delta, want, rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(matrices, st.randoms(use_true_random=False))
def test_rules_do_not_depend_on_the_order_of_the_updates(rows: np.ndarray, random: object) -> None:
    n = rows.shape[0]
    perm = np.array(random.sample(range(n), n))  # type: ignore[attr-defined]
    weights = np.arange(1.0, n + 1)
    for rule in (Median(), Median(weighted=True), TrimmedMean(beta=0.2), TrimmedMean(beta=0.2, weighted=True)):
        a = rule.apply(rows, weights).delta
        b = rule.apply(rows[perm], weights[perm]).delta
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(rows).max(initial=1.0)))
    np.testing.assert_array_equal(Median().apply(rows).delta, Median().apply(rows[perm]).delta)
    np.testing.assert_array_equal(
        TrimmedMean(beta=0.2).apply(rows).delta, TrimmedMean(beta=0.2).apply(rows[perm]).delta
    )
    f = (n - 3) // 2
    picked = {int(i) for i in krum(rows, f=f, m=2).report.selected}
    picked_perm = {int(perm[i]) for i in krum(rows[perm], f=f, m=2).report.selected}
    scores = np.array(krum(rows, f=f).report.scores)
    if len(np.unique(scores)) == n:  # without ties the same updates are picked
        assert picked == picked_perm


@settings(max_examples=40, deadline=None)
@given(matrices, st.integers(8, 4096))
def test_column_blocking_changes_nothing(rows: np.ndarray, work_bytes: int) -> None:
    weights = np.linspace(1.0, 3.0, rows.shape[0])
    for rule in (Median(), Median(weighted=True), TrimmedMean(beta=0.2, weighted=True)):
        np.testing.assert_array_equal(
            rule.apply(rows, weights, work_bytes=work_bytes).delta, rule.apply(rows, weights).delta
        )
    small = pairwise_sq_distances(rows, work_bytes=work_bytes)
    big = pairwise_sq_distances(rows)
    np.testing.assert_allclose(small, big, rtol=1e-6, atol=1e-6 * float(big.max(initial=1.0)))


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_rules_stay_within_their_working_memory_budget(half: bool) -> None:
    n, d, budget = 12, 60_000, 256 * 1024
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(n, d)).astype(np.float16 if half else np.float32)
    scale = np.full(n, 2.0, np.float32) if half else None
    weights = rng.uniform(1, 5, n)
    rules: list[RowRule] = [
        Median(),
        Median(weighted=True),
        TrimmedMean(beta=0.2),
        TrimmedMean(beta=0.2, weighted=True),
        Krum(f=4, m=3),
        Krum(f=4, m=3, weighted=True),
        ClippedMean(clip=1.0),
    ]
    allowed = budget + 4 * d + 8 * n * n + 64 * 1024  # work + the float32 result + Krum's distances + slack
    assert 8 * n * d > 5 * allowed  # one unblocked float64 copy of the rows would blow the bound
    for rule in rules:
        rule.apply(rows[:, :50], weights, row_scale=scale)  # warm-up: first calls import numpy submodules
        tracemalloc.start()
        try:
            result = rule.apply(rows, weights, row_scale=scale, work_bytes=budget)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= allowed, (rule, peak, allowed)
    observe_rows(rows[:, :50], result.delta[:50], [str(i) for i in range(n)], row_scale=scale)
    tracemalloc.start()
    try:
        observe_rows(rows, result.delta, [str(i) for i in range(n)], row_scale=scale, work_bytes=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= budget + 64 * 1024
