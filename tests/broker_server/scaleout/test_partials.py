"""Partial aggregates (pure): split the updates among workers, combine, get the one-server mean."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.aggregate import WeightedMean
from broker_server.persistence.records import AggregateCheckpoint
from broker_server.rounds import RoundState
from broker_server.scaleout import PartialsMismatch, checkpoint_of_partial, combine_partials
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SPECS = tuple(
    TensorSpec(name=name, shape=shape, dtype="float32", role="parameter", trainable=True, aggregate=True)
    for name, shape in (("w", (3, 4)), ("b", (4,)))
)


def update(i: int, codec: str = "int8") -> UpdateMessage:
    rng = np.random.default_rng(i)
    delta = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in SPECS}
    return UpdateMessage(
        device_id=f"d{i}",
        round=1,
        task_id=f"t{i}",
        model_version=0,
        num_examples=5 + 3 * i,
        metrics={"train_loss": 0.1 * i},
        codec=codec,
        payload=encode_update(delta, CodecSpec.parse(codec), rng=np.random.default_rng(0)),
    )


def round_state(updates: list[UpdateMessage]) -> RoundState:
    state = RoundState(
        round=1,
        model_version=0,
        tasks={f"t{i}": f"d{i}" for i in range(10)},
        specs=SPECS,
        codecs=frozenset({"int8", "fp32"}),
        mean=WeightedMean(group=3),
    )
    for message in updates:
        assert state.accept_update(message)
    return state


@pytest.mark.parametrize("split", [[10], [5, 5], [3, 3, 4], [1, 0, 9]])
def test_combined_partials_equal_one_servers_mean(split: list[int]) -> None:
    updates = [update(i, "int8" if i % 2 else "fp32") for i in range(10)]
    single = round_state(updates)
    parts, start = [], 0
    for k, size in enumerate(split):
        parts.append((f"s{k}", checkpoint_of_partial(round_state(updates[start : start + size]))))
        start += size
    combined = combine_partials(parts, frozenset(single.accepted))
    assert combined.count == 10 and combined.accepted == single.accepted
    assert combined.total_weight == single.mean.total_weight == sum(5 + 3 * i for i in range(10))
    assert combined.metric_sums["train_loss"] == pytest.approx(single.metric_sums["train_loss"], rel=1e-12)
    mean = WeightedMean.restore(combined.sums, total_weight=combined.total_weight, count=combined.count)
    for name, value in single.mean.result().items():
        # float32 group sums in another grouping: a few float32 ulps apart at most
        np.testing.assert_allclose(mean.result()[name], value, rtol=1e-6, atol=1e-7)
    # and the sums themselves against the plain float64 formula
    exact = {s.name: np.zeros(s.shape) for s in SPECS}
    for message in updates:
        reference = WeightedMean(group=1)
        reference.add_encoded(message.payload, 1.0, {s.name: s.shape for s in SPECS})
        for name, value in reference.sums().items():
            exact[name] += message.num_examples * value
    for name, value in exact.items():
        np.testing.assert_allclose(combined.sums[name], value, rtol=1e-6, atol=1e-6)


def checkpoint(tasks: set[str], value: float = 1.0) -> AggregateCheckpoint:
    return AggregateCheckpoint(
        sums={"w": np.full(2, value)}, total_weight=float(len(tasks)), count=len(tasks), accepted=frozenset(tasks)
    )


def test_a_task_in_two_partials_is_refused() -> None:
    with pytest.raises(PartialsMismatch, match="'t2' is in the partials of a and b"):
        combine_partials(
            [("a", checkpoint({"t1", "t2"})), ("b", checkpoint({"t2", "t3"}))], frozenset({"t1", "t2", "t3"})
        )


def test_an_accepted_task_in_no_partial_or_a_partial_task_not_accepted_is_refused() -> None:
    with pytest.raises(PartialsMismatch, match=r"in no partial: \['t3'\]"):
        combine_partials([("a", checkpoint({"t1"})), ("b", checkpoint({"t2"}))], frozenset({"t1", "t2", "t3"}))
    with pytest.raises(PartialsMismatch, match=r"not accepted: \['t9'\]"):
        combine_partials([("a", checkpoint({"t1", "t9"}))], frozenset({"t1"}))


def test_combination_adds_in_session_order_and_skips_empty_partials() -> None:
    got = combine_partials(
        [("b", checkpoint({"t2"}, 2.0)), ("a", checkpoint({"t1"}, 0.5)), ("c", AggregateCheckpoint())],
        frozenset({"t1", "t2"}),
    )
    np.testing.assert_array_equal(got.sums["w"], [2.5, 2.5])
    assert (got.count, got.total_weight) == (2, 2.0)
