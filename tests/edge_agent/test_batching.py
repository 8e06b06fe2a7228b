"""Batch slicing of the on-device training loop."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.runtime.trainer import batch_slices


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 18, 33, 49])
def test_batches_cover_every_example_once_and_never_hold_a_single_one(n: int) -> None:
    order = np.random.default_rng(n).permutation(n)
    batches = batch_slices(n, 16, order)
    np.testing.assert_array_equal(np.concatenate(batches), order)
    assert all(len(b) <= 17 for b in batches)
    assert n == 1 or all(len(b) > 1 for b in batches)


def test_a_trailing_single_example_joins_the_previous_batch() -> None:
    assert [len(b) for b in batch_slices(17, 16, np.arange(17))] == [17]
    assert [len(b) for b in batch_slices(33, 16, np.arange(33))] == [16, 17]
