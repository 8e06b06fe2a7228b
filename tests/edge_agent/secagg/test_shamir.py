"""Shamir sharing over GF(2^31 - 1): any t shares rebuild the secret, fewer reveal nothing checkable."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import InvalidShares
from edge_agent.secagg import shamir
from edge_agent.secagg.shamir import PRIME, Share
from tests.edge_agent.secagg.helpers import SeededRandom


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(2, 12),
    data=st.data(),
)
def test_any_t_subset_reconstructs(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, n, t, SeededRandom(data.draw(st.integers(0, 2**32))))
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique_by=lambda s: s.index))
    assert shamir.reconstruct(data.draw(st.permutations(subset))) == secret


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(3, 12), data=st.data())
def test_fewer_than_t_shares_do_not_give_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(2, n))
    shares = shamir.split(secret, n, t, SeededRandom(data.draw(st.integers(0, 2**32))))
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=1, max_size=t - 1, unique_by=lambda s: s.index))
    try:
        rebuilt = shamir.reconstruct(subset)
    except InvalidShares:
        return
    assert rebuilt != secret


def test_split_many_shapes_and_threshold_one_is_the_secret_itself() -> None:
    secrets = [bytes([i]) * 32 for i in range(3)]
    values = shamir.split_many(secrets, [5, 9, 300], 2, SeededRandom(0))
    assert values.shape == (3, 3, shamir.WORDS) and int(values.max()) < PRIME
    assert shamir.reconstruct_many([9, 300], values[1:]) == secrets
    ones = shamir.split_many(secrets, [1, 2], 1, SeededRandom(0))
    np.testing.assert_array_equal(ones[0], ones[1])  # t = 1: a constant polynomial, the secret words
    assert shamir.words_to_secret(ones[0, 2]) == secrets[2]


def test_duplicate_and_invalid_indices_are_refused() -> None:
    shares = shamir.split(b"\x07" * 32, 4, 2, SeededRandom(1))
    with pytest.raises(InvalidShares, match="duplicate"):
        shamir.reconstruct([shares[0], Share(shares[0].index, shares[1].data)])
    with pytest.raises(InvalidShares, match=r"1\.\.65535"):
        shamir.reconstruct([Share(0, shares[0].data), shares[1]])
    with pytest.raises(InvalidShares, match=r"1\.\.65535"):
        shamir.split_many([b"\x00" * 32], [1, 70000], 2, SeededRandom(1))
    with pytest.raises(InvalidShares, match="no shares"):
        shamir.reconstruct([])


def test_invalid_share_bytes_and_secrets_are_refused() -> None:
    with pytest.raises(InvalidShares, match="64 bytes"):
        shamir.reconstruct([Share(1, b"\x00" * 63)])
    with pytest.raises(InvalidShares, match="field prime"):
        shamir.reconstruct([Share(1, b"\xff" * 64)])
    with pytest.raises(InvalidShares, match="32 bytes"):
        shamir.split(b"short", 3, 2, SeededRandom(1))
    with pytest.raises(InvalidShares, match="threshold"):
        shamir.split(b"\x00" * 32, 3, 4, SeededRandom(1))
    with pytest.raises(InvalidShares, match="shape"):
        shamir.reconstruct_many([1, 2], np.zeros((3, 1, shamir.WORDS), dtype=np.int64))


def test_mixed_shares_of_two_splits_do_not_rebuild_either() -> None:
    a = shamir.split(b"\x01" * 32, 3, 3, SeededRandom(1))
    b = shamir.split(b"\x01" * 32, 3, 3, SeededRandom(2))
    with pytest.raises(InvalidShares, match="valid secret"):
        shamir.reconstruct([a[0], a[1], b[2]])


def test_random_field_redraws_the_prime() -> None:
    class Script:
        """Returns 0x7fffffff (== p after masking) first, then small values."""

        def __init__(self) -> None:
            self.calls = 0

        def token_bytes(self, n: int) -> bytes:
            self.calls += 1
            return b"\xff\xff\xff\x7f" * (n // 4) if self.calls == 1 else b"\x05\x00\x00\x00" * (n // 4)

    source = Script()
    values = shamir.random_field(source, (2, 3))
    assert values.tolist() == [[5, 5, 5], [5, 5, 5]] and source.calls == 2


def test_default_randomness_is_fresh_per_split() -> None:
    secret = bytes(range(32))
    first, second = shamir.split(secret, 5, 3), shamir.split(secret, 5, 3)
    assert [s.data for s in first] != [s.data for s in second]
    assert shamir.reconstruct(first[2:]) == shamir.reconstruct(second[:3]) == secret
