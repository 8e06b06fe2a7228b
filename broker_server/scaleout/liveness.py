"""Which workers still beat, and which of a round's claims the coordinator may count (pure).

The coordinator watches each worker session's beat counter on its own monotonic clock
(:class:`BeatWatch`; no clock of another host is involved). Two windows:

* **beating** — the counter was *seen to move* within ``beat_window_s`` (a few heartbeats, much
  shorter than the lease). A session first seen has not been seen to move yet: it is not beating
  until its next beat, so a coordinator that starts next to a dead worker's session never counts
  on it;
* **expired** — an alive session whose counter has not moved for ``lease_s``: the coordinator
  fences it (its unflushed claims are deleted and their TASKs sent again).

**Counting rule** (:func:`count_claims`). While a round collects, its outcome counts only the
claims that will be in a partial: failed claims and flushed accepted claims (durable), plus the
unflushed accepted claims of beating sessions. The unflushed claims of a session that stopped
beating are *pending*: counted neither as reports nor as failures, so their tasks stay
outstanding and the round waits — until the session beats again (it was only slow) or its lease
runs out, it is fenced and the TASKs are sent again (another worker counts the answers).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from broker_server.persistence.scaleout import ClaimTally, WorkerRow

__all__ = ["BeatWatch", "RoundCounts", "count_claims"]


@dataclass(frozen=True, kw_only=True)
class RoundCounts:
    """A round's claims under the counting rule (module docstring)."""

    #: accepted claims that will be in a partial (flushed, or held by a beating session)
    accepted: int
    failed: int
    #: unflushed accepted claims of sessions that stopped beating (not counted yet)
    pending: int
    #: the sessions holding the pending claims
    stopped: frozenset[str]


def count_claims(tally: Iterable[ClaimTally], beating: Collection[str]) -> RoundCounts:
    """Count ``tally`` (a round's claims by session) when the sessions in ``beating`` still beat."""
    accepted = failed = pending = 0
    stopped: set[str] = set()
    for row in tally:
        if row.outcome == "failed":
            failed += row.count
        elif row.flushed or row.session in beating:
            accepted += row.count
        else:
            pending += row.count
            stopped.add(row.session)
    return RoundCounts(accepted=accepted, failed=failed, pending=pending, stopped=frozenset(stopped))


@dataclass
class _Seen:
    beats: int
    since: float
    moved: bool


class BeatWatch:
    """The coordinator's view of the workers' beat counters (times on the coordinator's clock)."""

    def __init__(self, *, beat_window_s: float, lease_s: float) -> None:
        if not 0 < beat_window_s <= lease_s:
            raise ValueError(f"beat_window_s must be in (0, lease_s={lease_s}], got {beat_window_s}")
        self.beat_window_s, self.lease_s = beat_window_s, lease_s
        self._seen: dict[str, _Seen] = {}
        #: the alive sessions beating as of the last :meth:`observe`
        self.beating: frozenset[str] = frozenset()

    def observe(self, workers: Iterable[WorkerRow], now: float) -> list[str]:
        """Take the workers' counters read at ``now``; returns the alive sessions whose lease ran out."""
        beating, expired = set[str](), list[str]()
        for worker in workers:
            if worker.status != "alive":
                self._seen.pop(worker.session, None)
                continue
            seen = self._seen.get(worker.session)
            if seen is None:
                self._seen[worker.session] = seen = _Seen(beats=worker.beats, since=now, moved=False)
            elif seen.beats != worker.beats:
                seen.beats, seen.since, seen.moved = worker.beats, now, True
            if seen.moved and now - seen.since <= self.beat_window_s:
                beating.add(worker.session)
            if now - seen.since > self.lease_s:
                expired.append(worker.session)
        self.beating = frozenset(beating)
        return expired
