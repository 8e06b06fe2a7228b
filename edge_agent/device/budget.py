"""Participation budgets over a sliding window: pure functions of the participation history.

``history`` holds the Unix times at which this device started past participations; a
:class:`~edge_agent.device.policy.Budget` allows at most ``rounds`` of them in any window of length
``per``. A participation at ``t`` counts at time ``now`` while ``now - t < period``, which includes
stamps *after* ``now``: if the clock stepped back (a Raspberry Pi without an RTC boots with a stale
clock until NTP syncs), the budget stays closed rather than letting the device participate twice.
``None`` as a budget means unlimited.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from edge_agent.device.policy import Budget


def rounds_used(history: Iterable[float], budget: Budget, now_ts: float) -> int:
    """Participations that still count against ``budget`` at ``now_ts``."""
    period = budget.period_s
    return sum(1 for t in history if now_ts - t < period)


def budget_allows(history: Iterable[float], budget: Budget | None, now_ts: float) -> bool:
    """Whether one more participation may start at ``now_ts``."""
    return budget is None or rounds_used(history, budget, now_ts) < budget.rounds


def next_allowed_at(history: Iterable[float], budget: Budget | None, now_ts: float) -> float | None:
    """The earliest time >= ``now_ts`` at which :func:`budget_allows`; ``None`` if never (0 rounds)."""
    if budget is None:
        return now_ts
    if budget.rounds == 0:
        return None
    period = budget.period_s
    counting = sorted(t for t in history if now_ts - t < period)
    excess = len(counting) - budget.rounds
    if excess < 0:
        return now_ts
    # Once this one stops counting, at most rounds - 1 remain (all later stamps expire later).
    return _expiry(counting[excess], period)


def describe_budget(history: Iterable[float], budget: Budget, now_ts: float) -> str:
    """``"3/3 rounds per week used, next in 2d 4h"`` (the ``next`` part only when exhausted)."""
    stamps = list(history)
    used = rounds_used(stamps, budget, now_ts)
    text = f"{used}/{budget.rounds} rounds per {period_label(budget)} used"
    if used < budget.rounds:
        return text
    at = next_allowed_at(stamps, budget, now_ts)
    return f"{text}, never for this device class" if at is None else f"{text}, next in {format_duration(at - now_ts)}"


def period_label(budget: Budget) -> str:
    """``"week"`` for a named period, ``"1d 12h"`` for one given in seconds."""
    return budget.per if isinstance(budget.per, str) else format_duration(budget.period_s)


def format_duration(seconds: float) -> str:
    """A duration in its two largest units, for people: ``"2d 4h"``, ``"5m 3s"``, ``"0s"``."""
    rest = max(0, math.ceil(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    kept = [p for p in parts[:2] if not p.startswith("0")]
    return " ".join(kept) or "0s"


def _expiry(t: float, period: float) -> float:
    """The first float ``x`` with ``x - t >= period``: the moment a stamp ``t`` stops counting.

    ``t + period`` rounds, and may round down far enough that the stamp still counts there.
    """
    at = t + period
    while at - t < period:
        at = math.nextafter(at, math.inf)
    return at
