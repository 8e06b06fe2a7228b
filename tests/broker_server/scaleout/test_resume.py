"""Where a restarted coordinator continues an open round, and a closing round's outcome (pure)."""

from __future__ import annotations

from broker_server.rounds import RoundState
from broker_server.scaleout.resume import outcome_at_close, resume_step
from broker_server.selection import Abandon, Complete
from edge_agent.protocol.manifest import TensorSpec

TASKS = {"t1": "d1", "t2": "d2", "t3": "d3", "t4": "d4"}


def state(accepted: set[str], failed: dict[str, str] | None = None) -> RoundState:
    spec = TensorSpec(name="w", shape=(2,), dtype="float32", role="param", trainable=True, aggregate=True)
    return RoundState(
        round=3, model_version=2, tasks=dict(TASKS), specs=(spec,), accepted=accepted, failed=failed or {}
    )


def test_the_ledger_status_picks_the_step() -> None:
    assert resume_step(3, None, settled=False) == "open"
    assert resume_step(3, "collecting", settled=False) == "collect"
    assert resume_step(3, "closing", settled=False) == "gather"
    assert resume_step(3, "closing", settled=True) == "finish"
    closed = resume_step(3, "closed", settled=False)
    assert isinstance(closed, Abandon) and "round 3 is closed to the workers" in closed.reason


def test_a_closing_rounds_outcome_is_its_claims_with_the_deadline_passed() -> None:
    done = outcome_at_close(state({"t1", "t2"}, {"t3": "x"}), wanted=4, min_reports=2)
    assert isinstance(done, Complete) and done.reports == 2 and done.early  # t4 never answered
    short = outcome_at_close(state({"t1"}), wanted=4, min_reports=2)
    assert isinstance(short, Abandon) and short.reason == "1 updates by the deadline, need 2"
