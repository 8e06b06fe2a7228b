"""FedAvg math against hand-computed values (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.aggregate import WeightedMean, apply_delta, weighted_mean


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
