"""Device selection for synchronous rounds, and how a round ends: pure logic, no I/O.

:func:`select` picks the devices for one round from the registry's candidates:

1. a device that reported it cannot train now (``declines``) is never chosen;
2. a device that already took part in ``max_rounds_per_window`` rounds of the current window
   (counts from :class:`ParticipationHistory`) is skipped, so a few always-on devices cannot
   dominate the model;
3. the wanted count ``k`` (or ``ceil(fraction × eligible)``) is *over-selected* by a factor
   (e.g. 1.3): the round then completes with the first ``k`` reports and does not wait for
   stragglers (:func:`round_outcome`);
4. optionally stratified by device class: proportional allocation (largest remainder) with at
   least one device per present class when the target allows it.

Randomness comes only from the injected ``rng``; candidates are sorted by device id first, so a
selection is a function of (candidates, policy, history, rng state).

Stragglers (results for a round already closed) are dropped or, with ``late_update_policy="async"``,
handed to the buffered asynchronous path (:func:`route_late_update`, :mod:`broker_server.fedbuff`).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from broker_server.fedbuff import Accepted, FedBuff, Rejected
from broker_server.rounds import RoundState
from edge_agent.errors import ConfigError
from edge_agent.protocol.messages import UpdateMessage

#: float slack for ``ceil``: 1.1 × 10 is 11.000000000000002, which must stay 11
_EPSILON = 1e-9


class Candidate(Protocol):
    """What selection needs of a device (``broker_server.registry.DeviceRecord`` fits)."""

    @property
    def device_id(self) -> str: ...

    @property
    def declines(self) -> bool: ...


C = TypeVar("C", bound=Candidate)

ExclusionReason = Literal["declined", "over_budget"]
LateUpdatePolicy = Literal["drop", "async"]


@dataclass(frozen=True, kw_only=True)
class SelectionPolicy:
    #: devices wanted per round (exactly one of ``k`` and ``fraction``)
    k: int | None = None
    #: ... or this fraction of the eligible devices, rounded up
    fraction: float | None = None
    #: select ``ceil(over_selection × k)`` devices (capped by what is eligible)
    over_selection: float = 1.0
    #: allocate the selection proportionally across device classes
    stratify: bool = False
    #: a device takes part in at most this many rounds per window (None: no budget)
    max_rounds_per_window: int | None = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise ConfigError("give exactly one of k and fraction")
        if self.k is not None and self.k < 1:
            raise ConfigError("k must be >= 1")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError("fraction must be in (0, 1]")
        if not (math.isfinite(self.over_selection) and self.over_selection >= 1.0):
            raise ConfigError("over_selection must be a finite number >= 1")
        if self.max_rounds_per_window is not None and self.max_rounds_per_window < 1:
            raise ConfigError("max_rounds_per_window must be >= 1")

    def wanted(self, eligible: int) -> int:
        """Reports a round wants from ``eligible`` devices (before over-selection; may exceed them)."""
        if self.k is not None:
            return self.k
        assert self.fraction is not None
        return max(1, _ceil(self.fraction * eligible)) if eligible else 0

    def target(self, eligible: int) -> int:
        """Devices to select: the over-selected wanted count, capped by ``eligible``."""
        return min(eligible, _ceil(self.wanted(eligible) * self.over_selection))


@dataclass(frozen=True, kw_only=True)
class Selection:
    #: the chosen device ids, in selection order
    chosen: tuple[str, ...]
    #: reports the round wants (k); ``len(chosen)`` is larger when over-selecting
    wanted: int
    #: device id -> why it could not be chosen
    excluded: dict[str, ExclusionReason]
    #: device class -> devices chosen from it (one class, "", when not stratified)
    allocation: dict[str, int]
    eligible: int


def _ceil(value: float) -> int:
    return math.ceil(value - _EPSILON)


def select(
    candidates: Sequence[C],
    policy: SelectionPolicy,
    *,
    rng: random.Random,
    device_class_of: Callable[[C], str] | None = None,
    participation: Mapping[str, int] | None = None,
) -> Selection:
    """Choose this round's devices (see the module docstring for the rules).

    ``participation`` maps a device id to the rounds it took part in during the current budget
    window (:meth:`ParticipationHistory.counts`); ``device_class_of`` is needed to stratify.
    """
    if policy.stratify and device_class_of is None:
        raise ConfigError("stratified selection needs device_class_of")
    by_id: dict[str, C] = {}
    for candidate in candidates:
        if candidate.device_id in by_id:
            raise ValueError(f"device {candidate.device_id!r} is a candidate twice")
        by_id[candidate.device_id] = candidate
    excluded: dict[str, ExclusionReason] = {}
    eligible: list[C] = []
    counts = participation or {}
    budget = policy.max_rounds_per_window
    for device_id in sorted(by_id):
        candidate = by_id[device_id]
        if candidate.declines:
            excluded[device_id] = "declined"
        elif budget is not None and counts.get(device_id, 0) >= budget:
            excluded[device_id] = "over_budget"
        else:
            eligible.append(candidate)
    target = policy.target(len(eligible))
    if policy.stratify and device_class_of is not None:
        classes: dict[str, list[str]] = defaultdict(list)
        for candidate in eligible:
            classes[device_class_of(candidate)].append(candidate.device_id)
        allocation = allocate({name: len(ids) for name, ids in classes.items()}, target)
        chosen: list[str] = []
        for name in sorted(classes):
            chosen.extend(rng.sample(classes[name], allocation[name]))
        rng.shuffle(chosen)  # task order should not favour a class
    else:
        chosen = rng.sample([c.device_id for c in eligible], target)
        allocation = {"": target}
    return Selection(
        chosen=tuple(chosen),
        wanted=policy.wanted(len(eligible)),
        excluded=excluded,
        allocation={name: n for name, n in allocation.items() if n},
        eligible=len(eligible),
    )


def allocate(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` across classes of ``sizes`` proportionally (largest remainder).

    Every class gets at least one when ``total >= len(sizes)``; no class gets more than its size;
    ties go to the class whose name sorts first, so the split is deterministic.
    """
    population = sum(sizes.values())
    if any(n < 0 for n in sizes.values()) or not 0 <= total <= population:
        raise ValueError(f"cannot allocate {total} across class sizes {dict(sizes)}")
    if total == 0:
        return {name: 0 for name in sizes}
    quota = {name: total * n / population for name, n in sizes.items()}
    alloc = {name: min(n, math.floor(quota[name] + _EPSILON)) for name, n in sizes.items()}
    present = [name for name, n in sizes.items() if n > 0]
    if total >= len(present):
        for name in present:
            alloc[name] = max(alloc[name], 1)
    names = sorted(sizes)
    while (assigned := sum(alloc.values())) != total:
        if assigned < total:  # the class furthest below its quota gains one
            name = max((n for n in names if alloc[n] < sizes[n]), key=lambda n: quota[n] - alloc[n])
            alloc[name] += 1
        else:  # too many after the one-per-class floor: the class furthest above its quota gives one
            name = max((n for n in names if alloc[n] > 1), key=lambda n: alloc[n] - quota[n])
            alloc[name] -= 1
    return alloc


# -- participation budget ------------------------------------------------------------------------


@dataclass
class ParticipationHistory:
    """Which rounds each device took part in, for the ``max_rounds_per_window`` budget (json-able)."""

    #: device id -> round numbers it was selected for, ascending
    rounds: dict[str, list[int]] = field(default_factory=dict)

    def record(self, round_: int, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            history = self.rounds.setdefault(device_id, [])
            if not history or history[-1] < round_:
                history.append(round_)

    def counts(self, round_: int, window: int) -> dict[str, int]:
        """Rounds per device in the window of ``window`` rounds before ``round_`` (exclusive)."""
        if window < 1:
            raise ValueError("window must be >= 1")
        first = round_ - window
        return {
            device_id: n
            for device_id, history in self.rounds.items()
            if (n := sum(1 for r in history if first <= r < round_))
        }

    def forget_before(self, round_: int) -> None:
        """Drop rounds before ``round_`` (keeps memory bounded by the window)."""
        for device_id in list(self.rounds):
            kept = [r for r in self.rounds[device_id] if r >= round_]
            if kept:
                self.rounds[device_id] = kept
            else:
                del self.rounds[device_id]

    def to_json(self) -> dict[str, Any]:
        return {"rounds": {device_id: list(history) for device_id, history in self.rounds.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParticipationHistory:
        return cls(rounds={str(d): [int(r) for r in history] for d, history in data["rounds"].items()})


# -- how a round ends ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Wait:
    """Keep collecting."""


@dataclass(frozen=True, kw_only=True)
class Complete:
    reports: int
    #: True when the round closes before every selected device answered (over-selection or deadline)
    early: bool


@dataclass(frozen=True, kw_only=True)
class Abandon:
    reason: str


RoundOutcome = Wait | Complete | Abandon


def round_outcome(
    reports: int, *, wanted: int, min_reports: int, outstanding: int, deadline_passed: bool
) -> RoundOutcome:
    """Decide a round's fate from its counts.

    ``reports``: updates accepted; ``wanted``: the reports the round needs (k, before
    over-selection); ``outstanding``: selected devices that neither reported nor failed yet.
    Complete as soon as ``wanted`` reports are in; otherwise wait while devices are outstanding
    and the deadline has not passed; then complete with ``min_reports`` or abandon.
    """
    if reports < 0 or outstanding < 0 or min_reports < 1 or wanted < 1:
        raise ValueError("counts must be >= 0 and wanted, min_reports >= 1")
    if reports >= wanted:
        return Complete(reports=reports, early=outstanding > 0)
    if outstanding and not deadline_passed:
        return Wait()
    if reports >= min_reports:
        return Complete(reports=reports, early=outstanding > 0)
    why = "by the deadline" if outstanding else "from every selected device"
    return Abandon(reason=f"{reports} updates {why}, need {min_reports}")


@dataclass(frozen=True, kw_only=True)
class Dropped:
    reason: str


def route_late_update(
    update: UpdateMessage,
    closed: RoundState,
    *,
    policy: LateUpdatePolicy,
    buffer: FedBuff | None = None,
    current_version: int | None = None,
) -> Accepted | Rejected | Dropped:
    """Handle an update that arrived after its round ``closed``.

    ``drop`` refuses it. ``async`` offers it to ``buffer`` (its staleness counts the versions
    made since), but only if it answers a task ``closed`` issued to that device and the round
    did not already count a result for that task, so an update is never aggregated twice.
    """
    if update.round != closed.round:
        return Dropped(reason=f"update for round {update.round}, the closed round is {closed.round}")
    if closed.tasks.get(update.task_id) != update.device_id:
        return Dropped(reason=f"task {update.task_id!r} of round {closed.round} was not issued to {update.device_id!r}")
    if update.task_id in closed.accepted or update.task_id in closed.failed:
        return Dropped(reason=f"round {closed.round} already counted a result for task {update.task_id!r}")
    if policy == "drop":
        return Dropped(reason=f"round {closed.round} is closed (late updates are dropped)")
    if buffer is None:
        raise ConfigError("late_update_policy 'async' needs a FedBuff")
    return buffer.offer(update, current_version=current_version)
