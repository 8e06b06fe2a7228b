"""Sliding-window participation budgets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.device.budget import (
    budget_allows,
    describe_budget,
    format_duration,
    next_allowed_at,
    period_label,
    rounds_used,
)
from edge_agent.device.policy import Budget

DAY = 86_400.0
WEEK = 7 * DAY
NOW = 1_700_000_000.0
THREE_A_WEEK = Budget(rounds=3, per="week")


def test_only_participations_inside_the_window_count() -> None:
    history = [NOW - WEEK - 1, NOW - WEEK, NOW - WEEK + 1, NOW - DAY, NOW]

    assert rounds_used(history, THREE_A_WEEK, NOW) == 3
    assert not budget_allows(history, THREE_A_WEEK, NOW)
    assert budget_allows(history[:-1], THREE_A_WEEK, NOW)


def test_stamps_after_now_count_so_a_clock_stepping_back_does_not_reopen_the_budget() -> None:
    history = [NOW + 3600]

    assert rounds_used(history, Budget(rounds=1, per="day"), NOW) == 1
    assert not budget_allows(history, Budget(rounds=1, per="day"), NOW)


def test_next_allowed_is_when_the_oldest_counting_participation_expires() -> None:
    history = [NOW - 5 * DAY, NOW - 2 * DAY, NOW - DAY, NOW - 10 * DAY]

    at = next_allowed_at(history, THREE_A_WEEK, NOW)

    assert at == NOW + 2 * DAY
    assert budget_allows(history, THREE_A_WEEK, NOW + 2 * DAY)
    assert not budget_allows(history, THREE_A_WEEK, NOW + 2 * DAY - 1)


def test_next_allowed_is_now_when_allowed_or_unlimited_and_none_when_never() -> None:
    assert next_allowed_at([NOW - DAY], THREE_A_WEEK, NOW) == NOW
    assert next_allowed_at([NOW] * 10, None, NOW) == NOW
    assert budget_allows([NOW] * 10, None, NOW)
    assert next_allowed_at([], Budget(rounds=0, per="day"), NOW) is None
    assert not budget_allows([], Budget(rounds=0, per="day"), NOW)


def test_one_a_month_is_thirty_days() -> None:
    monthly = Budget(rounds=1, per="month")

    assert not budget_allows([NOW - 29 * DAY], monthly, NOW)
    assert budget_allows([NOW - 30 * DAY], monthly, NOW)


def test_description_says_how_much_is_used_and_when_the_next_round_may_start() -> None:
    history = [NOW - 5 * DAY, NOW - 2 * DAY, NOW - 3600]

    assert describe_budget(history, THREE_A_WEEK, NOW) == "3/3 rounds per week used, next in 2d"
    assert describe_budget(history[1:], THREE_A_WEEK, NOW) == "2/3 rounds per week used"
    assert describe_budget([], Budget(rounds=0, per=3600), NOW) == "0/0 rounds per 1h used, never for this device class"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.2, "1s"),
        (59, "59s"),
        (61, "1m 1s"),
        (3600, "1h"),
        (3 * 3600 + 65, "3h 1m"),
        (DAY * 2 + 4 * 3600 + 59, "2d 4h"),
    ],
)
def test_durations_print_their_two_largest_units(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_periods_in_seconds_print_as_durations() -> None:
    assert period_label(Budget(rounds=1, per=1.5 * DAY)) == "1d 12h"
    assert period_label(Budget(rounds=1, per="month")) == "month"


_budgets = st.builds(
    Budget,
    rounds=st.integers(1, 5),
    per=st.one_of(st.sampled_from(["day", "week"]), st.floats(1.0, 1e6)),
)
_times = st.lists(st.floats(NOW - 3e6, NOW + 3e6), max_size=40).map(sorted)


@given(_budgets, _times)
def test_an_agent_that_asks_first_never_exceeds_the_budget_in_any_window(budget: Budget, attempts: list[float]) -> None:
    history: list[float] = []
    for t in attempts:
        if budget_allows(history, budget, t):
            history.append(t)

    # The busiest window ends at a participation; count what lies within one period before it.
    busiest = max((sum(1 for s in history if 0 <= t - s < budget.period_s) for t in history), default=0)
    assert busiest <= budget.rounds


@given(_budgets, st.lists(st.floats(NOW - 3e6, NOW + 1e5), max_size=12), st.floats(NOW - 1e5, NOW + 1e5))
def test_next_allowed_is_the_earliest_allowed_time(budget: Budget, history: list[float], now: float) -> None:
    at = next_allowed_at(history, budget, now)

    assert at is not None and at >= now
    assert budget_allows(history, budget, at)
    if at > now:
        assert not budget_allows(history, budget, math.nextafter(at, -math.inf))
