"""A restored buffered round: its stored updates come back as rows only, checked against the stored sums."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from broker_server.aggregate import WeightedMean
from broker_server.robust_config import RobustSettings
from broker_server.rounds import RoundState
from broker_server.safeguards import Safeguards
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SPECS = (TensorSpec(name="w", shape=(3,), dtype="float32", role="parameter", trainable=True, aggregate=True),)
TASKS = {"t1": "d1", "t2": "d2", "t3": "d3", "t4": "d4"}
VALUES = {"d1": [1.0, 2.0, 3.0], "d2": [2.0, 0.0, 1.0], "d3": [9.0, 9.0, 9.0], "d4": [0.5, 0.5, 0.5]}
EXAMPLES = {"d1": 10, "d2": 20, "d3": 30, "d4": 40}


def update(device: str, *, value: list[float] | None = None, attempt: int = 1) -> UpdateMessage:
    task = {d: t for t, d in TASKS.items()}[device]
    payload = encode_update(
        {"w": np.array(value or VALUES[device], np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0)
    )
    return UpdateMessage(
        device_id=device,
        task_id=task,
        round=1,
        model_version=0,
        num_examples=EXAMPLES[device],
        metrics={"train_loss": 1.0},
        payload=payload,
        attempt=attempt,
    )


def restored(guard: Safeguards) -> RoundState:
    """Round 1 as the store gives it back after d1, d2 and d3 were accepted (sums, no rows)."""
    before = RoundState(round=1, model_version=0, tasks=dict(TASKS), specs=SPECS)
    for device in ("d1", "d2", "d3"):
        assert before.accept_update(update(device))
    mean = WeightedMean.restore(before.mean.sums(), total_weight=before.mean.total_weight, count=3)
    state = RoundState(
        round=1,
        model_version=0,
        tasks=dict(TASKS),
        specs=SPECS,
        mean=mean,
        accepted=set(before.accepted),
        metric_sums=dict(before.metric_sums),
    )
    assert guard.unresumable(state) == ""
    guard.prepare(state)
    return state


def median() -> Safeguards:
    return Safeguards(RobustSettings.parse({"rule": "median"}), None, SPECS)


def test_resent_updates_become_rows_without_being_counted_again() -> None:
    guard = median()
    state = restored(guard)
    assert state.refill is not None and state.refill.pending == {"t1": "d1", "t2": "d2", "t3": "d3"}
    assert state.buffer is not None and len(state.buffer) == 0
    for device in ("d3", "d1", "d2"):  # in another order than first accepted
        assert state.accept_update(update(device, attempt=2)) is False
    assert state.accept_update(update("d4"))  # the outstanding task, as new
    assert state.accept_update(update("d1", attempt=3)) is False  # a third copy is a plain duplicate
    assert state.refill.pending == {} and state.duplicates == 1
    assert (state.mean.count, state.num_examples, len(state.accepted)) == (4, 100, 4)
    assert guard.refilled(state) == "" and state.refill is None
    delta, _ = guard.aggregate(state)
    np.testing.assert_allclose(delta["w"], np.median(np.array(list(VALUES.values())), axis=0))


def test_a_swapped_update_fails_the_check_against_the_stored_sums() -> None:
    guard = median()
    state = restored(guard)
    state.accept_update(update("d1", attempt=2))
    state.accept_update(update("d2", attempt=2, value=[2.0, 0.0, 1.5]))
    state.accept_update(update("d3", attempt=2))
    assert guard.refilled(state) == (
        "server restarted; the re-sent updates differ from those accepted before the restart (tensor 'w')"
    )


def test_a_resent_update_claiming_other_example_counts_fails_the_check() -> None:
    guard = median()
    state = restored(guard)
    for device in ("d1", "d2", "d3"):
        message = update(device, attempt=2)
        if device == "d3":
            message = replace(message, num_examples=31)
        state.accept_update(message)
    assert guard.refilled(state).startswith("server restarted; 3 re-sent updates weigh 61, the 3 stored")


def test_rows_not_resent_by_the_deadline_become_failed_tasks() -> None:
    guard = median()
    state = restored(guard)
    state.accept_update(update("d1", attempt=2))
    state.accept_update(update("d4"))
    assert guard.refilled(state) == ""
    assert state.accepted == {"t1", "t4"} and set(state.failed) == {"t2", "t3"}
    assert state.failed["t2"] == "accepted before the server restarted; not re-sent before the deadline"
    assert state.accept_update(update("d2", attempt=2)) is False  # too late: a duplicate now
    assert state.buffer is not None and state.buffer.device_ids == ("d1", "d4")


def test_a_resent_update_is_still_checked_like_any_other() -> None:
    state = restored(median())
    forged = replace(update("d1", attempt=2), device_id="d2")
    with pytest.raises(ContractViolation, match="issued to 'd1'"):
        state.accept_update(forged)
    stale = replace(update("d1", attempt=2), model_version=7)
    with pytest.raises(ContractViolation, match="v7"):
        state.accept_update(stale)
    assert state.refill is not None and "t1" in state.refill.pending and state.buffer is not None
    assert len(state.buffer) == 0


def test_a_streaming_round_needs_no_refill() -> None:
    guard = Safeguards(RobustSettings.parse({"rule": "clip", "clip": 100.0}), None, SPECS)
    state = restored(guard)
    assert state.refill is None and state.buffer is None and guard.refilled(state) == ""
