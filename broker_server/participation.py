"""The server's device selection: :func:`~broker_server.selection.select` with a time budget.

:class:`RoundSelector` applies the configured :class:`SelectionPolicy` (over-selection, device
classes) to the registry's candidates and keeps the :class:`ParticipationHistory` the budget
needs: a device takes part in at most ``max_rounds_per_window`` rounds that started within the
last ``window_s`` seconds (wall clock, so a restarted server keeps counting; the history is
stored as a setting). Without a budget nothing is recorded.

Two limits come from outside the policy (:mod:`broker_server.safeguards`): devices to leave out
with a reason (quarantined by tiered trust: ``"quarantined: ..."``), and a cap on the devices
chosen (the rows a robust rule's update buffer holds). A capped selection keeps a random subset
of what the policy chose (its order is already random), and never wants more reports than it
sends tasks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker_server.registry import DeviceRecord
from broker_server.selection import ParticipationHistory, SelectionPolicy, select

__all__ = ["Choice", "RoundSelector"]


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One round's selection, after exclusions and the cap."""

    #: the chosen device ids, in selection order
    chosen: tuple[str, ...]
    #: reports the round wants (k, or the cap if smaller); ``len(chosen)`` is larger when over-selecting
    wanted: int
    #: devices the policy could choose from (online, holding the bundle, not excluded)
    eligible: int
    #: device id -> why it could not be chosen: "declined", "over_budget", or an exclusion's reason
    excluded: dict[str, str]
    #: devices the policy chose but the cap left out
    capped: int = 0


class RoundSelector:
    #: the store setting the history is kept under
    SETTING = "participation"

    def __init__(self, policy: SelectionPolicy, *, window_s: float | None, rng: random.Random) -> None:
        self.policy = policy
        self.window_s = window_s
        self.history = ParticipationHistory()
        #: round number -> wall-clock time its devices were chosen (budgeted rounds only)
        self.started: dict[int, float] = {}
        self._rng = rng

    @property
    def budgeted(self) -> bool:
        return self.window_s is not None and self.policy.max_rounds_per_window is not None

    def choose(
        self,
        number: int,
        candidates: Sequence[DeviceRecord],
        *,
        now: float,
        exclude: Mapping[str, str] | None = None,
        cap: int | None = None,
    ) -> Choice:
        """Choose round ``number``'s devices; never one in ``exclude``, at most ``cap`` of them."""
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        left_out = {d.device_id: exclude[d.device_id] for d in candidates if exclude and d.device_id in exclude}
        selection = select(
            [d for d in candidates if d.device_id not in left_out],
            self.policy,
            rng=self._rng,
            device_class_of=lambda record: record.device_class,
            participation=self.counts(number, now=now) if self.budgeted else None,
        )
        chosen, wanted = selection.chosen, selection.wanted
        if cap is not None and len(chosen) > cap:
            chosen, wanted = chosen[:cap], min(wanted, cap)
        return Choice(
            chosen=chosen,
            wanted=wanted,
            eligible=selection.eligible,
            excluded={**selection.excluded, **left_out},
            capped=len(selection.chosen) - len(chosen),
        )

    def counts(self, number: int, *, now: float) -> dict[str, int]:
        """Rounds before ``number`` each device took part in within the window ending ``now``."""
        assert self.window_s is not None
        recent = [r for r, at in self.started.items() if at > now - self.window_s and r < number]
        return self.history.counts(number, number - min(recent)) if recent else {}

    def record(self, number: int, chosen: Iterable[str], *, now: float) -> None:
        """Count round ``number`` against its devices' budgets (and forget what left the window)."""
        if not self.budgeted:
            return
        assert self.window_s is not None
        self.history.record(number, chosen)
        self.started[number] = now
        kept = {r: at for r, at in self.started.items() if at > now - self.window_s}
        self.history.forget_before(min(kept, default=number))
        self.started = kept

    def to_json(self) -> dict[str, Any]:
        return {"history": self.history.to_json(), "started": {str(r): at for r, at in self.started.items()}}

    def load_json(self, data: Mapping[str, Any] | None) -> None:
        if not data:
            return
        self.history = ParticipationHistory.from_json(data["history"])
        self.started = {int(r): float(at) for r, at in data["started"].items()}
