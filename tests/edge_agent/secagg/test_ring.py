"""Quantization to the ring Z_{2^k}: range, overflow bound, error bound, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import ConfigError, MalformedMessage, SecAggInputError
from edge_agent.secagg import ring
from edge_agent.secagg.ring import RingSpec


def test_codes_cover_the_shifted_range_and_clip() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=16)
    x = np.array([-5.0, -1.0, 0.0, 1.0, 5.0, 0.5])
    q = ring.quantize(x, spec, np.random.default_rng(0))
    assert q.dtype == np.dtype("<u4")
    assert q[:5].tolist() == [0, 0, 127, 254, 254]  # -clip -> 0, 0 -> L, +clip -> 2L
    assert q[5] in (190, 191)  # 0.5 * 127 = 63.5 rounds to a neighbour


def test_stochastic_rounding_is_unbiased() -> None:
    spec = RingSpec(clip=1.0, quant_bits=4, ring_bits=16)  # L = 7: a coarse grid shows any bias
    x = np.full(200_000, 0.3)
    q = ring.quantize(x, spec, np.random.default_rng(1)).astype(np.float64) - spec.levels
    assert abs(q.mean() * spec.step - 0.3) < 2e-3
    assert set(np.unique(q).tolist()) == {2.0, 3.0}  # 0.3 * 7 = 2.1: only the two neighbours


@pytest.mark.parametrize(("devices", "bits"), [(1, 8), (2, 9), (258, 16), (259, 17), (66052, 24), (66053, 25)])
def test_required_ring_bits_is_the_overflow_bound(devices: int, bits: int) -> None:
    assert ring.required_ring_bits(devices, 8) == bits
    spec = ring.ring_spec_for(devices, clip=1.0)
    assert spec.ring_bits % 8 == 0 and spec.ring_bits >= bits and spec.capacity >= devices


def test_capacity_many_maximal_codes_sum_without_wrapping() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=16)
    assert spec.capacity == 258
    ones = np.ones(3)
    acc = np.zeros(3, dtype=spec.dtype)
    for seed in range(spec.capacity):
        acc += ring.quantize(ones, spec, np.random.default_rng(seed))
    ring.reduce(acc, spec)
    np.testing.assert_array_equal(ring.decode_sum(acc, spec.capacity, spec), np.full(3, spec.capacity * 1.0))


def test_decoded_sum_within_quantization_bound() -> None:
    spec = ring.ring_spec_for(50, clip=0.2)
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 0.15, 1000) for _ in range(50)]
    acc = sum(ring.quantize(u, spec, rng).astype(np.int64) for u in updates)
    got = ring.decode_sum(np.asarray(acc, dtype=spec.dtype), 50, spec)
    want = sum(np.clip(u, -0.2, 0.2) for u in updates)
    error = np.abs(got - want).max()
    assert 0 < error < ring.quantization_bound(50, spec)
    np.testing.assert_allclose(ring.decode_mean(np.asarray(acc, dtype=spec.dtype), 50, spec), got / 50)


def test_decode_detects_masks_that_did_not_cancel() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=24)
    garbage = np.array([5, 2**23], dtype=spec.dtype)
    with pytest.raises(SecAggInputError, match="did not cancel"):
        ring.decode_sum(garbage, 10, spec)
    with pytest.raises(SecAggInputError, match="count"):
        ring.decode_sum(garbage, 0, spec)


def test_non_finite_and_non_flat_updates_are_refused() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=16)
    rng = np.random.default_rng(0)
    with pytest.raises(SecAggInputError, match="non-finite"):
        ring.quantize(np.array([0.0, np.nan]), spec, rng)
    with pytest.raises(SecAggInputError, match="flat float"):
        ring.quantize(np.zeros((2, 2)), spec, rng)
    with pytest.raises(SecAggInputError, match="flat float"):
        ring.quantize(np.zeros(3, dtype=np.int32), spec, rng)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"clip": 0.0, "quant_bits": 8, "ring_bits": 16}, "secagg.clip"),
        ({"clip": float("inf"), "quant_bits": 8, "ring_bits": 16}, "secagg.clip"),
        ({"clip": 1.0, "quant_bits": 1, "ring_bits": 16}, "secagg.quant_bits"),
        ({"clip": 1.0, "quant_bits": 8, "ring_bits": 7}, "secagg.ring_bits"),
        ({"clip": 1.0, "quant_bits": 8, "ring_bits": 65}, "secagg.ring_bits"),
    ],
)
def test_bad_ring_spec_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RingSpec(**kwargs)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 64), data=st.data())
def test_pack_roundtrip_any_ring_width(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=40))
    dtype = ring.word_dtype(bits)
    arr = np.array(values, dtype=dtype)
    packed = ring.pack(arr, bits)
    assert len(packed) == len(values) * ((bits + 7) // 8)
    np.testing.assert_array_equal(ring.unpack(packed, bits, len(values)), arr)


def test_unpack_rejects_wrong_size_and_high_bits() -> None:
    with pytest.raises(MalformedMessage, match="expected 6 bytes"):
        ring.unpack(b"\x00" * 5, 17, 2)
    with pytest.raises(MalformedMessage, match="not below 2\\*\\*17"):
        ring.unpack(b"\x00\x00\x02", 17, 1)  # bit 17 set
    assert ring.unpack(b"\xff\xff\x01", 17, 1).tolist() == [2**17 - 1]


def test_check_ring_vector() -> None:
    spec = RingSpec(clip=1.0, quant_bits=8, ring_bits=16)
    with pytest.raises(SecAggInputError, match="shape"):
        ring.check_ring_vector(np.zeros(3, dtype=np.uint32), spec, 4)
    with pytest.raises(SecAggInputError, match="integers"):
        ring.check_ring_vector(np.zeros(4), spec, 4)
    with pytest.raises(SecAggInputError, match=r"\[0, 2\*\*16\)"):
        ring.check_ring_vector(np.array([0, 1, 2, 2**16]), spec, 4)
    source = np.array([1, 2, 3, 4], dtype=np.int64)
    out = ring.check_ring_vector(source, spec, 4)
    out += 1
    assert source.tolist() == [1, 2, 3, 4] and out.dtype == spec.dtype
