"""FedAvg math against hand-computed values (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.aggregate import WeightedMean, apply_delta, weighted_mean
from edge_agent.codecs import CodecSpec, decode_update, encode_update, parse_update
from edge_agent.errors import MalformedMessage


def test_unequal_example_counts_weight_the_mean() -> None:
    # device A: 10 examples, delta 1.0; device B: 30 examples, delta 5.0 -> (10*1 + 30*5) / 40 = 4.0
    a = {"w": np.array([1.0, -2.0], dtype=np.float32), "b": np.array(0.0, dtype=np.float32)}
    b = {"w": np.array([5.0, 2.0], dtype=np.float32), "b": np.array(4.0, dtype=np.float32)}
    result = weighted_mean([(a, 10), (b, 30)])
    np.testing.assert_allclose(result["w"], [4.0, 1.0])
    np.testing.assert_allclose(result["b"], 3.0)
    assert result["w"].dtype == np.float32


def test_equal_counts_give_the_plain_mean_and_order_does_not_matter() -> None:
    updates = [({"w": np.array([float(i)], dtype=np.float32)}, 7) for i in range(5)]
    np.testing.assert_allclose(weighted_mean(updates)["w"], [2.0])
    np.testing.assert_allclose(weighted_mean(reversed(updates))["w"], [2.0])


def test_streaming_mean_keeps_one_accumulator_per_tensor() -> None:
    mean = WeightedMean()
    for i in range(100):
        mean.add({"w": np.full((3,), i, dtype=np.float32)}, 1 + i % 3)
    assert mean.count == 100
    assert len(mean._sums) == 1 and mean._sums["w"].shape == (3,)
    expected = sum(i * (1 + i % 3) for i in range(100)) / sum(1 + i % 3 for i in range(100))
    np.testing.assert_allclose(mean.result()["w"], expected, rtol=1e-6)


def test_mismatched_updates_and_bad_weights_are_refused() -> None:
    mean = WeightedMean()
    mean.add({"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        mean.add({"w": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="names"):
        mean.add({"v": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="positive"):
        mean.add({"w": np.zeros(2, np.float32)}, 0)
    with pytest.raises(ValueError, match="no updates"):
        WeightedMean().result()


def test_apply_delta_moves_only_listed_tensors() -> None:
    weights = {"w": np.array([1.0, 1.0], np.float32), "frozen": np.array([9.0], np.float32)}
    new = apply_delta(weights, {"w": np.array([0.5, -1.0], np.float32)}, server_lr=2.0)
    np.testing.assert_allclose(new["w"], [2.0, -1.0])
    np.testing.assert_allclose(new["frozen"], [9.0])
    assert weights["w"][0] == 1.0  # input untouched


SHAPES = {"conv": (4, 3, 3, 3), "bias": (4,), "fc": (10, 50)}


def _payload(seed: int, codec: str = "fp32") -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in SHAPES.items()}
    return encode_update(tensors, CodecSpec(codec), rng=rng)


def _magnitudes(payloads: list[tuple[bytes, float]]) -> dict[str, np.ndarray]:
    """sum(|w_i x_i|) per element: the scale of the float32 group sums' error bound."""
    total = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for payload, weight in payloads:
        for name, value in decode_update(payload, SHAPES).items():
            total[name] += np.abs(value.astype(np.float64)) * weight
    return total


@pytest.mark.parametrize("codec", ["fp32", "int8", "int8-channel", "topk"])
def test_group_fold_equals_one_by_one_fold(codec: str) -> None:
    """Groups sum fp32 and int8 tensors in float32 (edge_agent.codecs.partial): within the stated
    bound of the exact float64 fold, (group + 1) * 2**-24 * sum(|w x|); top-k stays exact."""
    payloads = [(_payload(seed, codec), float(16 + 7 * seed)) for seed in range(11)]
    one, grouped = WeightedMean(group=1), WeightedMean(group=4)
    for payload, weight in payloads:
        one.add_encoded(payload, weight, SHAPES)
        grouped.add_encoded(payload, weight, SHAPES)
        assert one.waiting == 0 and grouped.waiting == grouped.count % 4
    assert (grouped.count, grouped.total_weight) == (one.count, one.total_weight)
    bound = {name: 5 * 2.0**-24 * value for name, value in _magnitudes(payloads).items()}
    if codec == "topk":
        bound = {name: 1e-13 * value for name, value in bound.items()}
    for name, value in grouped.sums().items():  # sums() folds the 3 still waiting
        assert np.all(np.abs(value - one.sums()[name]) <= bound[name] * 1.0001 + 1e-300)
    assert grouped.waiting == 0
    for name, value in grouped.result().items():
        np.testing.assert_allclose(value, one.result()[name], rtol=1e-5, atol=1e-9)


def test_bad_update_inside_a_group_is_refused_and_leaves_the_mean_intact() -> None:
    mean = WeightedMean(group=3)
    mean.add_encoded(_payload(0), 10.0, SHAPES)
    good = _payload(1)
    bad = good[:-4] + np.float32(np.nan).tobytes()  # the last element of the last tensor
    with pytest.raises(MalformedMessage, match="non-finite"):
        mean.add_encoded(bad, 20.0, SHAPES)
    assert (mean.count, mean.total_weight, mean.waiting) == (1, 10.0, 1)
    mean.add_encoded(good, 20.0, SHAPES)
    untouched = WeightedMean(group=3)  # the same group without the refused update: bit for bit
    untouched.add_encoded(_payload(0), 10.0, SHAPES)
    untouched.add_encoded(good, 20.0, SHAPES)
    exact = WeightedMean(group=1)
    exact.add_encoded(_payload(0), 10.0, SHAPES)
    exact.add_encoded(good, 20.0, SHAPES)
    for name, value in mean.result().items():
        np.testing.assert_array_equal(value, untouched.result()[name])
        np.testing.assert_allclose(value, exact.result()[name], rtol=1e-5, atol=1e-9)


def test_a_waiting_mutable_payload_is_copied() -> None:
    buffer = bytearray(_payload(2))
    mean = WeightedMean(group=8)
    mean.add_encoded(buffer, 5.0, SHAPES)
    expected = WeightedMean(group=1)
    expected.add_encoded(bytes(buffer), 5.0, SHAPES)
    buffer[:] = _payload(3)  # the caller reuses its receive buffer before the group is folded
    assert mean.waiting == 1
    for name, value in mean.result().items():
        np.testing.assert_array_equal(value, expected.result()[name])


def test_group_bytes_caps_the_waiting_payload_data() -> None:
    payload = _payload(4)
    data_bytes = 4 * sum(int(np.prod(shape)) for shape in SHAPES.values())  # fp32 values held per update
    mean = WeightedMean(group=8, group_bytes=2 * data_bytes - 1)  # two updates' data exceed the cap
    mean.add_encoded(payload, 1.0, SHAPES)
    assert mean.waiting == 1
    mean.add_encoded(payload, 1.0, SHAPES)
    assert mean.waiting == 0
    with pytest.raises(ValueError, match="group"):
        WeightedMean(group=0)


def test_add_and_load_see_no_stale_waiting_updates() -> None:
    mean = WeightedMean(group=4)
    mean.add_encoded(_payload(5), 2.0, SHAPES)
    checkpoint = mean.sums()
    mean.add_encoded(_payload(6), 3.0, SHAPES)
    mean.load(checkpoint, total_weight=2.0, count=1)  # the waiting update is superseded, never folded later
    assert mean.waiting == 0
    restored = WeightedMean.restore(checkpoint, total_weight=2.0, count=1)
    for name, value in mean.result().items():
        np.testing.assert_array_equal(value, restored.result()[name])
    mean.add_encoded(_payload(7), 1.0, SHAPES)
    mean.add({name: np.ones(shape, np.float32) for name, shape in SHAPES.items()}, 1.0)  # folds the waiting one
    assert mean.waiting == 0 and mean.count == 3


def _poisoned(payload: bytes, name: str, index: int, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """``payload`` with element ``index`` of its fp32 tensor ``name`` set to NaN."""
    record = next(rec for rec in parse_update(payload, shapes).records if rec.name == name)
    at = record.data.__array_interface__["data"][0] - np.frombuffer(payload, np.uint8).__array_interface__["data"][0]
    at += 4 * index
    return payload[:at] + np.float32(np.nan).tobytes() + payload[at + 4 :]


BIG = {"w": (3, 70_000), "b": (1_000,)}  # 211,000 values: several 64K blocks, so two workers share them


def _big_payload(seed: int, codec: str) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in BIG.items()}
    return encode_update(tensors, CodecSpec(codec), rng=rng)


def test_a_poisoned_update_in_the_middle_of_k_is_refused_and_nothing_else_is_lost() -> None:
    updates = [(_payload(100 + i), float(10 + i)) for i in range(21)]
    poisoned = _poisoned(updates[10][0], "fc", 321, SHAPES)  # the 3rd member of the 2nd group of 8
    mean, clean = WeightedMean(), WeightedMean()
    for index, (payload, weight) in enumerate(updates):
        if index == 10:
            with pytest.raises(MalformedMessage, match="tensor 'fc': non-finite"):
                mean.add_encoded(poisoned, weight, SHAPES)
            assert (mean.count, mean.total_weight, mean.waiting) == (10, sum(w for _, w in updates[:10]), 2)
            continue
        mean.add_encoded(payload, weight, SHAPES)
        clean.add_encoded(payload, weight, SHAPES)
    assert (mean.count, mean.total_weight) == (clean.count, clean.total_weight)
    for name, value in mean.result().items():
        np.testing.assert_array_equal(value, clean.result()[name])


def test_one_update_is_folded_exactly_whatever_the_group() -> None:
    payload = _payload(200)
    grouped, single = WeightedMean(group=8), WeightedMean(group=1)
    grouped.add_encoded(payload, 37.0, SHAPES)
    single.add_encoded(payload, 37.0, SHAPES)
    want = {name: value.astype(np.float64) for name, value in decode_update(payload, SHAPES).items()}
    for name, value in grouped.sums().items():
        np.testing.assert_array_equal(value, single.sums()[name])
        np.testing.assert_array_equal(value, want[name] * 37.0)


def test_worker_threads_do_not_change_the_mean() -> None:
    updates = [(_big_payload(i, ("fp32", "int8")[i % 2]), float(5 + i)) for i in range(11)]
    means = [WeightedMean(workers=workers) for workers in (1, 2)]
    for payload, weight in updates:
        for mean in means:
            mean.add_encoded(payload, weight, BIG)
    one, two = (mean.sums() for mean in means)
    for name in BIG:
        np.testing.assert_array_equal(one[name], two[name])
    bad = _poisoned(updates[0][0], "w", 150_000, BIG)  # in the second worker's half
    with pytest.raises(MalformedMessage, match="tensor 'w': non-finite"):
        means[1].add_encoded(bad, 1.0, BIG)
    np.testing.assert_array_equal(means[1].sums()["w"], one["w"])


def test_an_update_above_group_bytes_is_folded_exactly_on_arrival() -> None:
    payloads = [(_payload(300 + i), float(3 + i)) for i in range(3)]
    big, exact = WeightedMean(group=8, group_bytes=1), WeightedMean(group=1)
    for payload, weight in payloads:
        big.add_encoded(payload, weight, SHAPES)
        exact.add_encoded(payload, weight, SHAPES)
        assert big.waiting == 0
    with pytest.raises(MalformedMessage, match="non-finite"):
        big.add_encoded(_poisoned(payloads[0][0], "conv", 5, SHAPES), 1.0, SHAPES)
    assert big.count == 3
    for name, value in big.sums().items():
        np.testing.assert_array_equal(value, exact.sums()[name])
