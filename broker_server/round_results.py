"""A round's :class:`~broker_server.server_config.RoundResult` from its state (one place for the
single server's round engine and the scale-out coordinator)."""

from __future__ import annotations

from broker_server.rounds import RoundState
from broker_server.server_config import RoundResult

__all__ = ["round_result"]


def round_result(
    number: int,
    state: RoundState | None,
    *,
    model_version: int,
    duration_s: float,
    completed: bool,
    reason: str = "",
    test_loss: float | None = None,
    test_accuracy: float | None = None,
) -> RoundResult:
    """The :class:`RoundResult` of round ``number`` as ``state`` holds it (None: it never opened)."""
    return RoundResult(
        round=number,
        model_version=model_version,
        selected=len(state.tasks) if state else 0,
        reported=len(state.accepted) if state else 0,
        failed=len(state.failed) if state else 0,
        num_examples=state.num_examples if state else 0,
        duration_s=duration_s,
        completed=completed,
        reason=reason,
        train_metrics=state.mean_metrics() if state and completed else {},
        test_loss=test_loss,
        test_accuracy=test_accuracy,
    )
