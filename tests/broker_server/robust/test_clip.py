"""Norm clipping: per-update bound, buffered and streaming agree, drop-in for the round's mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from broker_server.aggregate import WeightedMean
from broker_server.robust import ClippedMean, ClippedWeightedMean, Flattener, UpdateBuffer, clip_update, clipped_mean
from broker_server.rounds import RoundState
from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.errors import MalformedMessage
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

SHAPES = {"w": (4, 5), "b": (5,)}


def update(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def norm(tensors: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in tensors.values())))


def encode(tensors: dict[str, np.ndarray], codec: str = "fp32") -> bytes:
    return encode_update(tensors, CodecSpec(codec), rng=np.random.default_rng(0))


def test_clip_update_scales_large_updates_and_leaves_small_ones_alone() -> None:
    rng = np.random.default_rng(0)
    small = update(rng, 0.01)
    clipped, stats = clip_update(small, 10.0)
    assert stats.factor == 1.0 and not stats.clipped
    for name in SHAPES:
        np.testing.assert_array_equal(clipped[name], small[name])
    large = update(rng, 100.0)
    clipped, stats = clip_update(large, 2.0)
    assert stats.clipped and stats.norm == pytest.approx(norm(large))
    assert norm(clipped) == pytest.approx(2.0, rel=1e-6)
    for name in SHAPES:  # direction kept
        np.testing.assert_allclose(clipped[name], large[name] * (2.0 / norm(large)), rtol=1e-6)
    with pytest.raises(ValueError, match="clip"):
        clip_update(large, 0.0)


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 40), elements=st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)),
    st.floats(1e-6, 1e6),
)
def test_a_clipped_update_never_exceeds_the_bound(values: np.ndarray, bound: float) -> None:
    clipped, stats = clip_update({"x": values}, bound)
    assert norm(clipped) <= bound * (1 + 1e-6)
    assert 0.0 < stats.factor <= 1.0
    if stats.factor == 1.0:
        np.testing.assert_array_equal(clipped["x"], values)


def test_an_update_with_100x_the_norm_contributes_at_most_c() -> None:
    rng = np.random.default_rng(1)
    flat = Flattener(SHAPES)
    rows = np.stack([flat.flatten(update(rng)) for _ in range(6)])
    bound = 1.01 * float(np.linalg.norm(rows, axis=1).max())  # honest updates are never clipped
    weights = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    attacked, zeroed = rows.copy(), rows.copy()
    attacked[2] *= 100.0 * bound / np.linalg.norm(rows[2])
    zeroed[2] = 0.0
    with_attack = clipped_mean(attacked, weights, clip=bound)
    without = clipped_mean(zeroed, weights, clip=bound)
    share = np.linalg.norm(with_attack.delta.astype(np.float64) - without.delta)
    assert share <= bound * weights[2] / weights.sum() * (1 + 1e-5)
    assert with_attack.report.clipped == (2,)
    assert with_attack.report.factors[2] == pytest.approx(0.01, rel=1e-4)
    assert with_attack.report.norms[2] == pytest.approx(100.0 * bound, rel=1e-5)
    plain = np.average(attacked, axis=0, weights=weights)
    assert np.linalg.norm(plain - without.delta) > 10 * bound  # unclipped, the same update dominates


def test_clipped_mean_with_a_large_bound_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(5, 9)).astype(np.float32)
    weights = rng.uniform(1, 10, 5)
    result = ClippedMean(clip=1e9).apply(rows, weights, work_bytes=100)
    np.testing.assert_allclose(result.delta, np.average(rows, axis=0, weights=weights), rtol=1e-5, atol=1e-6)
    unweighted = ClippedMean(clip=1e9, weighted=False).apply(rows, weights)
    np.testing.assert_allclose(unweighted.delta, rows.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert result.report.clipped == ()


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk-int8"])
def test_streaming_clipping_matches_the_buffered_rule(codec: str) -> None:
    rng = np.random.default_rng(3)
    flat = Flattener(SHAPES)
    payloads = [encode(update(rng, scale), codec) for scale in (0.1, 1.0, 50.0, 3.0)]
    weights = [5.0, 10.0, 1.0, 7.0]
    streaming = ClippedWeightedMean(clip=2.0)
    buffer = UpdateBuffer(flat, rows=4)
    for i, (data, weight) in enumerate(zip(payloads, weights, strict=True)):
        streaming.add_encoded(data, weight, flat.expected)
        buffer.add_encoded(f"d{i}", data, weight)
    buffered = buffer.aggregate(ClippedMean(clip=2.0))
    result = streaming.result()
    np.testing.assert_allclose(flat.flatten(result), buffered.delta, rtol=1e-5, atol=1e-7)
    assert [s.factor for s in streaming.stats] == pytest.approx(list(buffered.report.factors), rel=1e-6)
    assert streaming.total_weight == sum(weights) and streaming.count == 4  # clipping keeps the weights
    assert len(streaming._sums) == len(SHAPES)  # still one accumulator per tensor


def test_streaming_dict_path_and_reference_stats() -> None:
    rng = np.random.default_rng(4)
    reference = update(rng)
    tensors = update(rng, 3.0)
    streaming = ClippedWeightedMean(clip=1.0, reference=reference)
    streaming.add(tensors, 2.0)
    streaming.add_encoded(encode(tensors), 2.0, {k: v for k, v in SHAPES.items()})
    flat = Flattener(SHAPES)
    x, r = flat.flatten(tensors).astype(np.float64), flat.flatten(reference).astype(np.float64)
    for stats in streaming.stats:
        assert stats.norm == pytest.approx(np.linalg.norm(x))
        assert stats.cosine == pytest.approx(x @ r / (np.linalg.norm(x) * np.linalg.norm(r)))
        assert stats.distance == pytest.approx(np.linalg.norm(x - r))
    np.testing.assert_allclose(flat.flatten(streaming.result()), x / np.linalg.norm(x), rtol=1e-6)


def test_a_bad_payload_leaves_the_streaming_mean_unchanged() -> None:
    rng = np.random.default_rng(5)
    streaming = ClippedWeightedMean(clip=1.0)
    streaming.add_encoded(encode(update(rng)), 3.0, SHAPES)
    before = streaming.result()
    with pytest.raises(MalformedMessage):
        streaming.add_encoded(encode(update(rng, 1e3))[:-2], 3.0, SHAPES)
    with pytest.raises(ValueError, match="weight"):
        streaming.add_encoded(encode(update(rng)), float("inf"), SHAPES)
    with pytest.raises(ValueError, match="shape"):
        streaming.add_encoded(
            encode({"w": np.zeros((5, 4), np.float32), "b": np.zeros(5, np.float32)}), 1.0, {**SHAPES, "w": (5, 4)}
        )
    assert streaming.count == 1 and streaming.total_weight == 3.0 and len(streaming.stats) == 1
    for name, value in streaming.result().items():
        np.testing.assert_array_equal(value, before[name])


def test_clipped_mean_is_a_drop_in_for_the_rounds_streaming_mean() -> None:
    specs = tuple(
        TensorSpec(name=n, shape=s, dtype="float32", role="parameter", trainable=True, aggregate=True)
        for n, s in SHAPES.items()
    )
    state = RoundState(
        round=1, model_version=0, tasks={"t1": "d1", "t2": "d2"}, specs=specs, mean=ClippedWeightedMean(clip=1.0)
    )
    rng = np.random.default_rng(6)
    honest, hostile = update(rng, 0.01), update(rng, 1e4)
    for device, task, tensors in (("d1", "t1", honest), ("d2", "t2", hostile)):
        message = UpdateMessage(
            device_id=device, round=1, task_id=task, model_version=0, num_examples=10, payload=encode(tensors)
        )
        assert state.accept_update(message)
    assert isinstance(state.mean, WeightedMean)
    assert norm(state.mean.result()) <= (norm(honest) + 1.0) / 2 + 1e-6  # the hostile update counts as norm 1
