"""The server's device selection: :func:`~broker_server.selection.select` with a time budget.

:class:`RoundSelector` applies the configured :class:`SelectionPolicy` (over-selection, device
classes) to the registry's candidates and keeps the :class:`ParticipationHistory` the budget
needs: a device takes part in at most ``max_rounds_per_window`` rounds that started within the
last ``window_s`` seconds (wall clock, so a restarted server keeps counting; the history is
stored as a setting). Without a budget nothing is recorded.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from broker_server.registry import DeviceRecord
from broker_server.selection import ParticipationHistory, Selection, SelectionPolicy, select

__all__ = ["RoundSelector"]


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

    def choose(self, number: int, candidates: Sequence[DeviceRecord], *, now: float) -> Selection:
        return select(
            candidates,
            self.policy,
            rng=self._rng,
            device_class_of=lambda record: record.device_class,
            participation=self.counts(number, now=now) if self.budgeted else None,
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
