"""What a restarted scale-out coordinator does with the round it left open (pure).

The store says where the round was: the journal's round row (open), the ledger's
``scaleout_rounds`` status, and whether the close's :meth:`ScaleoutLedger.settle` committed (the
round's tasks then carry results in ``round_tasks``: scale-out writes them only when settling).
:func:`resume_step` maps that to the step to continue with:

* ``"open"`` — no ledger row: the coordinator died between storing the round and opening it to
  the workers, so no TASK was sent and no worker could claim: open it and send every TASK;
* ``"collect"`` — the round still collects (workers kept claiming meanwhile): send the TASKs that
  have no claim yet again, and collect until the stored deadline;
* ``"gather"`` — the round was closing: claims stopped, so the outcome is decided by the claims
  as they are (the deadline counts as passed); wait for the workers' last flushes and combine;
* ``"finish"`` — the close was settled: the combined aggregate is the stored checkpoint; decide
  and complete (or abandon) from it without combining again;
* :class:`Abandon` — the ledger says ``closed`` while the round is still open in the journal:
  only a pre-resume coordinator that was abandoning the round leaves that, and whether the round
  reached a version is not recorded in a way that can be checked, so it is abandoned (it never
  produced a model version: a completion closes the journal's round first).
"""

from __future__ import annotations

from typing import Literal

from broker_server.rounds import RoundState
from broker_server.selection import Abandon, Complete, Wait, round_outcome

__all__ = ["ResumeStep", "outcome_at_close", "resume_step"]

ResumeStep = Literal["open", "collect", "gather", "finish"]


def resume_step(number: int, status: str | None, *, settled: bool) -> ResumeStep | Abandon:
    """The step round ``number`` continues with (module docstring); ``status``: its ledger status."""
    if status is None:
        return "open"
    if status == "collecting":
        return "collect"
    if status == "closing":
        return "finish" if settled else "gather"
    return Abandon(
        reason=f"round {number} is closed to the workers but still open in the store (a coordinator "
        "stopped while abandoning it); it cannot be resumed"
    )


def outcome_at_close(state: RoundState, *, wanted: int, min_reports: int) -> Complete | Abandon:
    """A round's outcome once claims stopped (a restart found it closing): its counts as they
    are, with the deadline taken as passed — what the coordinator that closed it had decided,
    since no claim can be added to a closing round."""
    accepted, failed = len(state.accepted), len(state.failed)
    outcome = round_outcome(
        accepted,
        wanted=wanted,
        min_reports=min_reports,
        outstanding=len(state.tasks) - accepted - failed,
        deadline_passed=True,
    )
    return Abandon(reason="no outcome at the close") if isinstance(outcome, Wait) else outcome  # never Wait
