"""Acceptance rules of one round: at most once, only the issued device, only the model's shapes."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.rounds import RoundState, validate_delta
from edge_agent.errors import ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

SPECS = (TensorSpec(name="w", shape=(2,), dtype="float32", role="parameter", trainable=True, aggregate=True),)


def update(device: str = "d1", task: str = "t1", n: int = 10, value: float = 1.0, **kw) -> UpdateMessage:
    fields = {"round": 1, "model_version": 0, "metrics": {"train_loss": value}}
    fields.update(kw)
    return UpdateMessage(
        device_id=device, task_id=task, num_examples=n, delta={"w": np.full(2, value, np.float32)}, **fields
    )


def state() -> RoundState:
    return RoundState(round=1, model_version=0, tasks={"t1": "d1", "t2": "d2"}, specs=SPECS)


def test_duplicate_update_is_counted_once() -> None:
    s = state()
    assert s.accept_update(update())
    assert not s.accept_update(update(value=100.0))
    assert s.duplicates == 1 and s.mean.count == 1
    np.testing.assert_allclose(s.mean.result()["w"], [1.0, 1.0])


def test_round_finishes_when_every_task_reported_or_failed() -> None:
    s = state()
    s.accept_update(update())
    assert not s.finished
    s.record_error(ErrorMessage(device_id="d2", round=1, task_id="t2", code="training_error", reason="x"))
    assert s.finished and s.failed == {"t2": "training_error: x"}


def test_metrics_are_example_weighted() -> None:
    s = state()
    s.accept_update(update(n=10, value=1.0))
    s.accept_update(update(device="d2", task="t2", n=30, value=5.0))
    assert s.mean_metrics()["train_loss"] == pytest.approx(4.0)
    assert s.num_examples == 40


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (update(task="nope"), "unknown task"),
        (update(device="d2"), "issued to 'd1'"),
        (update(round=2), "round 2"),
        (update(model_version=5), "v5"),
        (update(n=10**9), "num_examples"),
    ],
)
def test_unacceptable_updates_are_rejected_and_change_nothing(bad: UpdateMessage, match: str) -> None:
    s = state()
    with pytest.raises(ContractViolation, match=match):
        s.accept_update(bad)
    assert s.mean.count == 0 and not s.accepted


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        ({"w": np.zeros(3, np.float32)}, "shape"),
        ({"w": np.zeros(2, np.float64)}, "dtype"),
        ({"w": np.array([np.nan, 0], np.float32)}, "NaN"),
        ({}, "missing"),
        ({"w": np.zeros(2, np.float32), "x": np.zeros(1, np.float32)}, "unexpected"),
    ],
)
def test_validate_delta(delta: dict, match: str) -> None:
    with pytest.raises(ContractViolation, match=match):
        validate_delta(delta, SPECS)
