"""Train/validation splits: the streaming hash and the in-memory permutation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.data import Dataset
from edge_agent.datasources import split_in_memory, validation_mask
from edge_agent.errors import ConfigError


def test_the_hash_holds_out_about_the_fraction_and_depends_on_the_seed() -> None:
    rows = np.arange(100_000)
    mask = validation_mask(rows, 0.2, seed=3)
    assert abs(mask.mean() - 0.2) < 0.01
    assert np.array_equal(mask, validation_mask(rows, 0.2, seed=3))
    other = validation_mask(rows, 0.2, seed=4)
    assert abs((mask & other).mean() - 0.04) < 0.01  # independent, not shifted copies


def test_a_rows_side_depends_only_on_its_number() -> None:
    whole = validation_mask(np.arange(10_000), 0.3, seed=1)
    pieces = np.concatenate([validation_mask(np.arange(a, a + 999), 0.3, seed=1) for a in range(0, 10_000, 999)])
    assert np.array_equal(whole, pieces[:10_000])


def test_nothing_is_held_out_at_fraction_zero() -> None:
    assert not validation_mask(np.arange(1000), 0.0, seed=0).any()


@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.6), seed=st.integers(0, 2**32))
def test_the_in_memory_split_is_exact_disjoint_and_keeps_row_order(n: int, fraction: float, seed: int) -> None:
    data = Dataset(np.arange(n, dtype=np.float32).reshape(n, 1), np.arange(n, dtype=np.int64))
    split = split_in_memory(data, fraction, seed, source="test")
    assert split.validation is not None
    held = split.validation.y
    assert len(held) == round(n * fraction)
    assert np.array_equal(np.sort(np.concatenate([split.train.y, held])), np.arange(n))
    assert np.all(np.diff(split.train.y) > 0) and np.all(np.diff(held) > 0)
    assert np.array_equal(split.train.x[:, 0], split.train.y.astype(np.float32))


def test_the_in_memory_split_is_reproducible_and_absent_at_zero() -> None:
    data = Dataset(np.zeros((50, 2), np.float32), np.arange(50))
    first, again = (split_in_memory(data, 0.3, 9, source="t") for _ in range(2))
    assert first.validation is not None and again.validation is not None
    assert np.array_equal(first.validation.y, again.validation.y)
    assert split_in_memory(data, 0.0, 9, source="t").validation is None


@pytest.mark.parametrize(("n", "fraction", "message"), [(0, 0.1, "no data rows"), (1, 0.9, "leaves none to train")])
def test_an_impossible_split_is_a_config_error(n: int, fraction: float, message: str) -> None:
    data = Dataset(np.zeros((n, 2), np.float32), np.zeros(n, np.int64))
    with pytest.raises(ConfigError, match=message):
        split_in_memory(data, fraction, 0, source="t")
