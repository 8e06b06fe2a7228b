"""Per-record codec ids and positional tensor references (FFCU v1 records)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.codecs import (
    CODEC_IDS,
    CODEC_NAMES,
    MILD_CODECS,
    CodecSpec,
    UpdateInfo,
    accumulate_update,
    decode_update,
    encode_update,
    parse_update,
    payload_codec,
)
from edge_agent.errors import ContractViolation, MalformedMessage, ProtocolError, UnsupportedVersion
from tests.edge_agent.codecs.helpers import CNN_SHAPES, cnn_delta, f32, payload, record, varint

MAIN = CodecSpec("topk-int8", fraction=0.05)
#: BatchNorm parameters as int8 and the biases as fp32 inside a topk-int8 update
OVERRIDES = {
    **{name: CodecSpec("int8") for name in CNN_SHAPES if name.startswith("bn")},
    **{name: CodecSpec("fp32") for name in ("conv1.bias", "fc.bias")},
}
ORDER = list(CNN_SHAPES)
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _codec_of(name: str) -> str:
    return OVERRIDES.get(name, MAIN).name


def _mixed(seed: int, *, order: list[str] | None = None, zstd: bool = False) -> bytes:
    # with zstd, keep half of each tensor: its index gaps compress well, so the body really is compressed
    spec = CodecSpec(MAIN.name, fraction=0.5 if zstd else MAIN.fraction, zstd=zstd)
    return encode_update(cnn_delta(seed), spec, rng=np.random.default_rng(seed), overrides=OVERRIDES, order=order)


def _zeros() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape) for name, shape in CNN_SHAPES.items()}


# --- the hand-rolled builder agrees with the encoder -------------------------------------------


def test_helpers_build_the_encoders_bytes() -> None:
    delta = {"w": np.array([1.0, -2.0], np.float32), "b": np.array(0.5, np.float32)}
    rng = np.random.default_rng(0)
    want = payload("fp32", record("w", (2,), "fp32", f32(1.0, -2.0)), record("b", (), "fp32", f32(0.5)))
    assert encode_update(delta, CodecSpec("fp32"), rng=rng) == want
    want = payload("fp32", record(1, (2,), "fp32", f32(1.0, -2.0)), record(0, (), "fp32", f32(0.5)))
    assert encode_update(delta, CodecSpec("fp32"), rng=rng, order=["b", "w"]) == want
    mixed = encode_update(delta, CodecSpec("topk"), rng=rng, overrides={"b": CodecSpec("fp16")})
    want = payload(
        "topk",
        record("w", (2,), "topk", varint(1), varint(1), f32(-2.0)),
        record("b", (), "fp16", np.array([0.5], "<f2").tobytes()),
    )
    assert mixed == want


# --- per-record codecs -------------------------------------------------------------------------


def test_overrides_write_each_records_own_codec_and_the_header_keeps_the_main_one() -> None:
    data = _mixed(0)
    assert data[5] == CODEC_IDS["topk-int8"]
    assert payload_codec(data) == "topk-int8"
    parsed = parse_update(data, CNN_SHAPES)
    assert parsed.codec.name == "topk-int8" and parsed.info.codec == "topk-int8"
    assert {rec.name: parsed.record_codec(rec).name for rec in parsed.records} == {n: _codec_of(n) for n in ORDER}
    assert {rec.name: rec.codec_id for rec in parsed.records} == {n: CODEC_IDS[_codec_of(n)] for n in ORDER}


def test_mixed_update_round_trips_each_tensor_with_its_codec() -> None:
    delta = cnn_delta(0)
    out = decode_update(_mixed(0), CNN_SHAPES)
    assert list(out) == ORDER
    for name, x in delta.items():
        got = out[name]
        assert got.dtype == np.float32 and got.shape == x.shape
        codec = _codec_of(name)
        if codec == "fp32":
            np.testing.assert_array_equal(got, x)
        elif codec == "int8":  # dense: every element within one quantization step
            scale = float(np.abs(x).max()) / 127
            assert np.abs(got.astype(np.float64) - x).max() <= scale * (1 + 1e-5)
        else:  # topk-int8: only the k largest magnitudes survive, each within one step
            k = MAIN.topk_count(x.size)
            kept = np.flatnonzero(got)
            assert 0 < len(kept) <= k
            top = np.sort(np.abs(x).reshape(-1))[-k]
            assert (np.abs(x.reshape(-1)[kept]) >= top).all()
            scale = float(np.abs(x.reshape(-1)[kept]).max()) / 127
            assert np.abs(got.reshape(-1)[kept] - x.reshape(-1)[kept]).max() <= scale * (1 + 1e-5)


@pytest.mark.parametrize("zstd", [False, True])
def test_mixed_updates_accumulate_to_the_weighted_sum_of_decodes(zstd: bool) -> None:
    payloads = [_mixed(seed, zstd=zstd) for seed in range(3)]
    weights = [0.5, 0.25, 2.0]
    acc = _zeros()
    infos = [accumulate_update(p, acc, w, CNN_SHAPES) for p, w in zip(payloads, weights, strict=True)]
    want = _zeros()
    for p, w in zip(payloads, weights, strict=True):
        for name, value in decode_update(p, CNN_SHAPES).items():
            want[name] += w * value.astype(np.float64)
    for name in CNN_SHAPES:
        np.testing.assert_allclose(acc[name], want[name], rtol=1e-6, atol=1e-9)
    assert infos[0] == UpdateInfo("topk-int8", 10, 6186, len(payloads[0]), payloads[0][6] == 1)
    # the overridden tensors are dense, the others sparse
    assert np.count_nonzero(acc["conv1.bias"]) == 16
    assert np.count_nonzero(acc["conv2.weight"]) <= 3 * CodecSpec(MAIN.name, 0.5).topk_count(32 * 16 * 9)
    assert all(p[6] == int(zstd) for p in payloads)


def test_hand_crafted_mixed_update_decodes_and_accumulates_exactly() -> None:
    """Each record's data is read and folded with its own codec, not the header's."""
    data = payload(
        "topk-int8",
        record("q", (2,), "int8", f32(0.5), b"\x02\xfe"),  # [1.0, -1.0]
        record("f", (3,), "fp32", f32(1.5, 0.0, -2.0)),
        record("h", (1,), "fp16", np.array([0.25], "<f2").tobytes()),
        record("t", (4,), "topk-int8", varint(2), f32(0.25), varint(1), varint(1), b"\x04\xf8"),  # idx 1, 3
    )
    shapes = {"q": (2,), "f": (3,), "h": (1,), "t": (4,)}
    out = decode_update(data, shapes)
    assert {name: value.tolist() for name, value in out.items()} == {
        "q": [1.0, -1.0],
        "f": [1.5, 0.0, -2.0],
        "h": [0.25],
        "t": [0.0, 1.0, 0.0, -2.0],
    }
    acc = {name: np.ones(shape) for name, shape in shapes.items()}
    info = accumulate_update(data, acc, 2.0, shapes)
    assert info == UpdateInfo("topk-int8", 4, 10, len(data), False)
    assert {name: value.tolist() for name, value in acc.items()} == {
        "q": [3.0, -1.0],
        "f": [4.0, 1.0, -3.0],
        "h": [1.5],
        "t": [1.0, 3.0, 1.0, -3.0],
    }
    assert payload_codec(data) == "topk-int8"


@pytest.mark.parametrize("main", CODEC_NAMES)
def test_a_record_may_use_the_updates_codec_or_a_mild_one(main: str) -> None:
    # a 2x2 tensor of ones in every codec, all of which decode it exactly
    data_for = {
        "fp32": f32(1, 1, 1, 1),
        "fp16": np.ones(4, "<f2").tobytes(),
        "int8": f32(1.0) + b"\x01" * 4,
        "int8-channel": f32(1.0, 1.0) + b"\x01" * 4,
        "int4": f32(1.0) + b"\x11\x11",
        "int2": f32(1.0) + b"\x55",
        "sign": f32(1.0) + b"\x0f",
        "topk": varint(4) + b"\0" * 4 + f32(1, 1, 1, 1),
        "topk-int8": varint(4) + f32(1.0) + b"\0" * 4 + b"\x01" * 4,
    }
    assert set(data_for) == set(CODEC_NAMES)
    for codec, data in data_for.items():
        p = payload(main, record("w", (2, 2), codec, data))
        if codec == main or codec in MILD_CODECS:
            assert decode_update(p, {"w": (2, 2)})["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
        else:
            with pytest.raises(ContractViolation, match=f"'w' uses codec '{codec}' inside a {main} update"):
                decode_update(p)


@pytest.mark.parametrize("codec_id", [0, 10, 128, 255])
def test_unknown_per_record_codec_id_is_unsupported(codec_id: int) -> None:
    good = record("a", (1,), "int8", f32(1.0), b"\x01")
    bad = record("b", (2,), codec_id, f32(1.0, 2.0))
    with pytest.raises(UnsupportedVersion, match=f"tensor 'b': unknown codec id {codec_id} "):
        decode_update(payload("int8", good, bad))
    acc = {"a": np.zeros(1), "b": np.zeros(2)}
    with pytest.raises(UnsupportedVersion, match=f"unknown codec id {codec_id}"):
        accumulate_update(payload("int8", good, bad), acc, 1.0, {"a": (1,), "b": (2,)})
    assert not acc["a"].any() and not acc["b"].any()
    # the same record is fine with a known codec id: the id is the only problem
    fixed = record("b", (2,), "fp32", f32(1.0, 2.0))
    assert decode_update(payload("int8", good, fixed))["b"].tolist() == [1.0, 2.0]


# --- positional references ---------------------------------------------------------------------


@pytest.mark.parametrize("zstd", [False, True])
def test_positional_round_trip_equals_the_named_one(zstd: bool) -> None:
    named, positional = _mixed(1, zstd=zstd), _mixed(1, order=ORDER, zstd=zstd)
    assert named != positional
    want = decode_update(named, CNN_SHAPES)
    got = decode_update(positional, CNN_SHAPES)
    assert list(got) == ORDER
    for name in ORDER:
        np.testing.assert_array_equal(got[name], want[name])
    acc_named, acc_positional = _zeros(), _zeros()
    accumulate_update(named, acc_named, 0.5, CNN_SHAPES)
    info = accumulate_update(positional, acc_positional, 0.5, CNN_SHAPES)
    assert info == UpdateInfo("topk-int8", 10, 6186, len(positional), positional[6] == 1)
    assert positional[6] == int(zstd)
    for name in ORDER:
        np.testing.assert_array_equal(acc_positional[name], acc_named[name])


def test_positions_index_the_expected_order_not_the_payload_order() -> None:
    delta = cnn_delta(2)
    shuffled = {name: delta[name] for name in reversed(ORDER)}  # records in another order than ``order``
    data = encode_update(shuffled, CodecSpec("fp32"), rng=np.random.default_rng(0), order=ORDER)
    assert data[12:14] == b"\x00" + varint(ORDER.index("fc.bias"))  # first record: position of fc.bias
    out = decode_update(data, CNN_SHAPES)
    assert list(out) == list(shuffled)
    for name in ORDER:
        np.testing.assert_array_equal(out[name], delta[name])
    # the same positions against a differently ordered model list resolve to other tensors
    with pytest.raises(ContractViolation, match="shape"):
        decode_update(data, {name: CNN_SHAPES[name] for name in reversed(ORDER)})


def test_positional_payload_is_smaller_by_the_names_bytes() -> None:
    named, positional = _mixed(3), _mixed(3, order=ORDER)
    # named: u8 N + N name bytes; positional: 0x00 + a one-byte varint (10 < 128 tensors)
    assert len(named) - len(positional) == sum(len(name.encode()) - 1 for name in ORDER)
    assert len(positional) < len(named)


def test_multi_byte_positions() -> None:
    names = [f"t{i}" for i in range(300)]
    expected = {name: (1,) for name in names}
    delta = {name: np.array([float(i)], np.float32) for i, name in enumerate(names)}
    data = encode_update(delta, CodecSpec("fp32"), rng=np.random.default_rng(0), order=names)
    out = decode_update(data, expected)
    assert [float(out[name][0]) for name in names] == list(range(300))
    records = [record(i, (1,), "fp32", f32(float(i))) for i in range(300)]
    assert data == payload("fp32", *records)
    assert varint(299) == b"\xab\x02"


def test_positional_reference_without_a_tensor_list_is_a_contract_violation() -> None:
    data = _mixed(0, order=ORDER)
    with pytest.raises(ContractViolation, match="tensor 0 is referenced by position"):
        decode_update(data)
    with pytest.raises(ContractViolation, match="position"):
        parse_update(data)
    # a named record before it is fine; the positional one is still refused
    mixed = payload("fp32", record("a", (1,), "fp32", f32(1.0)), record(1, (1,), "fp32", f32(2.0)))
    with pytest.raises(ContractViolation, match="tensor 1 is referenced by position"):
        decode_update(mixed)
    assert {k: v.tolist() for k, v in decode_update(mixed, {"a": (1,), "b": (1,)}).items()} == {"a": [1.0], "b": [2.0]}


@pytest.mark.parametrize("position", [2, 3, 127, 128, 2**32 - 1])
def test_position_beyond_the_tensor_list(position: int) -> None:
    expected = {"a": (1,), "b": (1,)}
    good = payload("fp32", record(0, (1,), "fp32", f32(1.0)), record(1, (1,), "fp32", f32(2.0)))
    assert {k: v.tolist() for k, v in decode_update(good, expected).items()} == {"a": [1.0], "b": [2.0]}
    bad = payload("fp32", record(0, (1,), "fp32", f32(1.0)), record(position, (1,), "fp32", f32(2.0)))
    with pytest.raises(ContractViolation, match=f"tensor 1: position {position} beyond the model's 2 tensors"):
        decode_update(bad, expected)
    acc = {"a": np.zeros(1), "b": np.zeros(1)}
    with pytest.raises(ContractViolation, match="beyond"):
        accumulate_update(bad, acc, 1.0, expected)
    assert not acc["a"].any() and not acc["b"].any()
    with pytest.raises(ContractViolation, match="position 0 beyond the model's 0 tensors"):
        decode_update(payload("fp32", record(0, (1,), "fp32", f32(1.0))), {})


@pytest.mark.parametrize(
    "records",
    [
        [record("a", (1,), "fp32", f32(1.0)), record(0, (1,), "fp32", f32(2.0))],
        [record(0, (1,), "fp32", f32(1.0)), record("a", (1,), "fp32", f32(2.0))],
        [record(0, (1,), "fp32", f32(1.0)), record(0, (1,), "fp32", f32(2.0))],
    ],
    ids=["name-then-position", "position-then-name", "position-twice"],
)
def test_a_position_and_a_name_for_the_same_tensor_are_a_duplicate(records: list[bytes]) -> None:
    expected = {"a": (1,), "b": (1,)}
    data = payload("fp32", *records, record("b", (1,), "fp32", f32(3.0)))
    with pytest.raises(MalformedMessage, match="duplicate tensor name 'a'"):
        decode_update(data, expected)
    acc = {"a": np.zeros(1), "b": np.zeros(1)}
    with pytest.raises(MalformedMessage, match="duplicate"):
        accumulate_update(data, acc, 1.0, expected)
    assert not acc["a"].any() and not acc["b"].any()


def test_positional_records_are_checked_against_the_expected_shapes() -> None:
    expected = {"a": (2,), "b": ()}
    good = payload("fp32", record(0, (2,), "fp32", f32(1.0, 2.0)), record(1, (), "fp32", f32(3.0)))
    assert {k: v.tolist() for k, v in decode_update(good, expected).items()} == {"a": [1.0, 2.0], "b": 3.0}
    with pytest.raises(ContractViolation, match=r"'b': shape \(2,\) != expected \(\)"):
        decode_update(good, {"b": (), "a": (2,)})  # same names, other order: position 0 is now 'b'
    with pytest.raises(ContractViolation, match=r"lacks tensors \['b'\]"):
        decode_update(payload("fp32", record(0, (2,), "fp32", f32(1.0, 2.0))), expected)


def test_encode_rejects_a_tensor_missing_from_the_order() -> None:
    with pytest.raises(ValueError, match="order and the update differ"):
        encode_update({"c": np.zeros(1, np.float32)}, CodecSpec("fp32"), rng=np.random.default_rng(0), order=["a"])


def test_encode_rejects_a_bad_order_or_a_harsh_override() -> None:
    rng = np.random.default_rng(0)
    delta = {"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="twice"):
        encode_update(delta, CodecSpec("fp32"), rng=rng, order=["w", "w", "b"])
    with pytest.raises(ValueError, match="differ"):
        encode_update(delta, CodecSpec("fp32"), rng=rng, order=["w", "b", "extra"])
    with pytest.raises(ValueError, match="'sign' in a fp32 update"):
        encode_update(delta, CodecSpec("fp32"), rng=rng, overrides={"w": CodecSpec("sign")})


def test_truncated_mixed_positional_payload_at_every_byte_offset() -> None:
    data = _mixed(4, order=ORDER)
    decode_update(data, CNN_SHAPES)
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage, match="truncated"):
            decode_update(data[:cut], CNN_SHAPES)


# --- properties --------------------------------------------------------------------------------

finite32 = st.floats(-6e4, 6e4, width=32)  # fp16 can carry them
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), elements=finite32)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=6).filter(lambda s: len(s.encode()) <= 255)


@FAST
@given(
    st.dictionaries(names, tensors, min_size=1, max_size=4),
    st.sampled_from(CODEC_NAMES),
    st.data(),
)
def test_positional_and_named_encodings_carry_the_same_data(
    delta: dict[str, np.ndarray], main: str, data: st.DataObject
) -> None:
    spec = CodecSpec(main, fraction=0.4) if main.startswith("topk") else CodecSpec(main)
    allowed = sorted(MILD_CODECS | {main})
    overrides = {name: CodecSpec(data.draw(st.sampled_from(allowed))) for name in delta}
    order = data.draw(st.permutations(list(delta)))
    expected = {name: delta[name].shape for name in order}
    named = encode_update(delta, spec, rng=np.random.default_rng(7), overrides=overrides)
    positional = encode_update(delta, spec, rng=np.random.default_rng(7), overrides=overrides, order=order)
    assert len(named) - len(positional) == sum(len(name.encode()) - 1 for name in delta)
    assert payload_codec(named) == payload_codec(positional) == main
    got, want = decode_update(positional, expected), decode_update(named, expected)
    assert list(got) == list(want) == list(delta)
    for name in delta:
        np.testing.assert_array_equal(got[name], want[name])
        if overrides[name].name == "fp32":
            np.testing.assert_array_equal(got[name], delta[name])
    records = parse_update(positional, expected).records
    assert [rec.codec_id for rec in records] == [overrides[name].codec_id for name in delta]


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_random_corruption_of_a_mixed_positional_update_never_leaks_other_errors(data: st.DataObject) -> None:
    valid = bytearray(_mixed(5, order=ORDER))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(valid) - 1))
        valid[position] = data.draw(st.integers(0, 255))
    acc = _zeros()
    with contextlib.suppress(ProtocolError):
        accumulate_update(bytes(valid), acc, 1.0, CNN_SHAPES, max_elements=1 << 16)
