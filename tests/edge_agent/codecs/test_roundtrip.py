"""encode_update / decode_update: accuracy bounds, unbiased rounding, top-k selection, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.codecs import CODEC_NAMES, CodecSpec, decode_update, encode_update, parse_update
from edge_agent.codecs.reader import Reader, encode_varints
from tests.edge_agent.codecs.helpers import CNN_SHAPES, cnn_delta

QUANTIZERS = {"int8": 127, "int8-channel": 127, "int4": 7, "int2": 1}
STOCHASTIC = ["int8", "int8-channel", "int4", "int2", "topk-int8"]

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6), elements=finite32)
updates = st.dictionaries(st.text(min_size=1, max_size=8), tensors, min_size=0, max_size=3)
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _roundtrip(delta: dict[str, np.ndarray], spec: CodecSpec, seed: int = 0) -> dict[str, np.ndarray]:
    payload = encode_update(delta, spec, rng=np.random.default_rng(seed))
    out = decode_update(payload, {name: value.shape for name, value in delta.items()})
    assert list(out) == list(delta)
    for name, value in out.items():
        assert value.dtype == np.float32 and value.shape == delta[name].shape and value.flags.writeable
    return out


def _scales(x: np.ndarray, name: str) -> np.ndarray:
    """Per-element scale the quantizer used (recomputed the encoder's way)."""
    levels = QUANTIZERS[name]
    if name == "int8-channel" and x.ndim >= 2 and x.size:
        amax = np.abs(x.reshape(x.shape[0], -1)).max(axis=1)
        return np.repeat(amax.astype(np.float64) / levels, x.size // x.shape[0]).reshape(x.shape)
    amax = float(np.abs(x).max()) if x.size else 0.0
    return np.full(x.shape, amax / levels)


@FAST
@given(updates, st.sampled_from(CODEC_NAMES), st.booleans())
def test_every_codec_round_trips_within_its_bound(delta: dict[str, np.ndarray], name: str, zstd: bool) -> None:
    spec = CodecSpec(name, fraction=0.3, zstd=zstd) if name.startswith("topk") else CodecSpec(name, zstd=zstd)
    if name == "fp16":
        delta = {key: np.clip(value, -6e4, 6e4) for key, value in delta.items()}
    out = _roundtrip(delta, spec)
    for key, x in delta.items():
        got = out[key].astype(np.float64)
        if name == "fp32":
            np.testing.assert_array_equal(out[key], x)
        elif name == "fp16":
            np.testing.assert_array_equal(out[key], x.astype(np.float16).astype(np.float32))
        elif name in QUANTIZERS:
            bound = _scales(x, name) * (1 + 1e-5) + 1e-44
            assert (np.abs(got - x) <= bound).all()
        elif name == "sign":
            scale = np.float32(np.abs(x).mean(dtype=np.float64)) if x.size else 0.0
            np.testing.assert_array_equal(np.abs(out[key]), np.full(x.shape, scale, dtype=np.float32))
            assert (np.where(x >= 0, 1, -1) * out[key] >= 0).all()


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_all_zero_tensor_has_scale_zero_and_decodes_to_zeros(name: str) -> None:
    delta = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(0, np.float32), "s": np.zeros((), np.float32)}
    out = _roundtrip(delta, CodecSpec(name))
    for key, value in out.items():
        np.testing.assert_array_equal(value, np.zeros_like(delta[key]))
    records = parse_update(encode_update(delta, CodecSpec(name), rng=np.random.default_rng(0))).records
    for rec in records:
        assert rec.scales is None or not rec.scales.any()


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_rounding_is_unbiased(name: str) -> None:
    # The first element pins the scale; each probe value sits between two code levels.
    levels = 127 if "int8" in name else QUANTIZERS[name]
    probes = np.array([0.3, -0.71, 0.05, -0.999, 0.5, 0.123456], dtype=np.float64)
    draws = 40_000
    x = np.concatenate([[1.0], np.repeat(probes, draws)]).astype(np.float32)
    spec = CodecSpec(name, fraction=1.0) if name.startswith("topk") else CodecSpec(name)
    out = decode_update(encode_update({"x": x}, spec, rng=np.random.default_rng(1234)))["x"]
    means = out[1:].astype(np.float64).reshape(len(probes), draws).mean(axis=1)
    scale = 1.0 / levels
    # Each draw is one of two levels scale apart: std <= scale / 2; 6 sigma of the mean.
    tolerance = 6 * (scale / 2) / np.sqrt(draws) + 1e-6
    np.testing.assert_allclose(means, x[1::draws].astype(np.float64), rtol=0, atol=tolerance)
    # ... and it really is stochastic: both neighbouring levels occur.
    assert len(np.unique(out[1 : 1 + draws])) == 2


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_deterministic_given_the_rng(name: str) -> None:
    delta = cnn_delta(3)
    first = encode_update(delta, CodecSpec(name), rng=np.random.default_rng(7))
    assert encode_update(delta, CodecSpec(name), rng=np.random.default_rng(7)) == first
    if name in STOCHASTIC:
        assert encode_update(delta, CodecSpec(name), rng=np.random.default_rng(8)) != first


@FAST
@given(tensors, st.sampled_from([0.001, 0.01, 0.2, 0.5, 1.0]), st.sampled_from(["topk", "topk-int8"]))
def test_topk_keeps_exactly_the_k_largest_magnitudes(x: np.ndarray, fraction: float, name: str) -> None:
    spec = CodecSpec(name, fraction=fraction)
    payload = encode_update({"x": x}, spec, rng=np.random.default_rng(0))
    (rec,) = parse_update(payload).records
    assert rec.indices is not None
    k = 0 if x.size == 0 else max(1, int(np.ceil(fraction * x.size)))
    assert len(rec.indices) == k == spec.topk_count(x.size)
    flat = x.reshape(-1)
    np.testing.assert_array_equal(np.sort(np.abs(flat[rec.indices])), np.sort(np.abs(flat))[x.size - k :])
    out = decode_update(payload)["x"].reshape(-1)
    dropped = np.ones(x.size, bool)
    dropped[rec.indices] = False
    assert not out[dropped].any()
    if name == "topk":
        np.testing.assert_array_equal(out[rec.indices], flat[rec.indices])


def test_topk_fraction_is_per_tensor() -> None:
    delta = cnn_delta(1)
    records = parse_update(encode_update(delta, CodecSpec("topk", fraction=0.01), rng=np.random.default_rng(0))).records
    ks = {rec.name: len(rec.indices) for rec in records if rec.indices is not None}
    assert ks == {name: max(1, int(np.ceil(0.01 * np.prod(shape)))) for name, shape in CNN_SHAPES.items()}


def test_int8_channel_uses_one_scale_per_output_channel() -> None:
    x = np.stack([np.linspace(-1, 1, 6) * 10.0**i for i in range(-3, 3)]).astype(np.float32).reshape(6, 2, 3)
    payload = encode_update({"w": x}, CodecSpec("int8-channel"), rng=np.random.default_rng(0))
    (rec,) = parse_update(payload).records
    assert rec.scales is not None
    np.testing.assert_allclose(rec.scales, np.abs(x).reshape(6, -1).max(axis=1) / 127, rtol=1e-6)
    out = decode_update(payload)["w"]
    assert (np.abs(out - x).reshape(6, -1) <= rec.scales[:, None] * (1 + 1e-6)).all()


def test_fp16_overflow_and_bad_input_raise_value_error() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"'w'.*float16"):
        encode_update({"w": np.array([7e4], np.float32)}, CodecSpec("fp16"), rng=rng)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match=r"'w'.*non-finite"):
            encode_update({"w": np.array([1.0, bad], np.float32)}, CodecSpec("int8"), rng=rng)
    with pytest.raises(ValueError, match=r"'w'.*float32"):
        encode_update({"w": np.ones(3, np.float64)}, CodecSpec("fp32"), rng=rng)
    with pytest.raises(ValueError, match="name"):
        encode_update({"": np.ones(3, np.float32)}, CodecSpec("fp32"), rng=rng)
    with pytest.raises(ValueError, match="dims"):
        encode_update({"w": np.ones((1,) * 9, np.float32)}, CodecSpec("fp32"), rng=rng)


def test_extreme_magnitudes_round_trip_within_bounds() -> None:
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    for values in ([3.4e38, -3.4e38, 1.0], [tiny, -tiny, 0.0], [1e-40, 3e-41, -2e-42]):
        x = np.array(values, np.float32)
        for name, levels in QUANTIZERS.items():
            out = _roundtrip({"x": x}, CodecSpec(name))["x"].astype(np.float64)
            scale = np.abs(x.astype(np.float64)).max() / levels
            assert (np.abs(out - x) <= scale * 1.001 + 2e-45).all(), (name, values, out)


def test_compression_ratios_on_a_small_cnn() -> None:
    delta = cnn_delta(0)
    sizes = {
        name: len(encode_update(delta, CodecSpec.parse(name), rng=np.random.default_rng(0)))
        for name in ("fp32", "int8", "int4", "topk-int8:0.01")
    }
    assert sizes["fp32"] / sizes["int8"] >= 3.9
    assert sizes["fp32"] / sizes["int4"] >= 7.5
    assert sizes["fp32"] / sizes["topk-int8:0.01"] >= 50


def test_zstd_flag_only_when_it_helps() -> None:
    rng = np.random.default_rng(0)
    compressible = {"w": np.zeros(10_000, np.float32)}
    compressible["w"][::100] = 1.0
    packed = encode_update(compressible, CodecSpec("fp32", zstd=True), rng=rng)
    plain = encode_update(compressible, CodecSpec("fp32"), rng=rng)
    assert packed[6] == 1 and plain[6] == 0 and len(packed) < len(plain) / 10
    np.testing.assert_array_equal(decode_update(packed)["w"], compressible["w"])
    noise = {"w": rng.standard_normal(64).astype(np.float32)}
    assert encode_update(noise, CodecSpec("topk", zstd=True), rng=rng)[6] == 0  # nothing to gain: sent as is


@FAST
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_varints_round_trip(values: list[int]) -> None:
    encoded = encode_varints(np.array(values, dtype=np.uint64))
    reader = Reader(encoded)
    np.testing.assert_array_equal(reader.varints(len(values), "test"), np.array(values, dtype=np.uint64))
    assert reader.remaining == 0
