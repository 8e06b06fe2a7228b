"""Flattener and UpdateBuffer: layout, the byte cap, refusal without corruption, float16 precision."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.robust import BufferConfig, BufferFull, Flattener, Median, UpdateBuffer, coordinate_median
from edge_agent.codecs import CodecSpec, decode_update, encode_update
from edge_agent.errors import ContractViolation, MalformedMessage
from edge_agent.protocol.manifest import TensorSpec

SHAPES = {"conv.w": (2, 3), "conv.b": (3,), "scale": ()}
DIM = 10


def spec(name: str, shape: tuple[int, ...], aggregate: bool = True) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, dtype="float32", role="parameter", trainable=True, aggregate=aggregate)


def tensors(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def payload(values: dict[str, np.ndarray], codec: str = "fp32") -> bytes:
    return encode_update(values, CodecSpec.parse(codec), rng=np.random.default_rng(1))


def snapshot(buffer: UpdateBuffer) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[np.ndarray]]:
    return buffer.matrix.copy(), buffer.weights, buffer.device_ids, [buffer.row(i) for i in range(len(buffer))]


def assert_same(buffer: UpdateBuffer, before: tuple[np.ndarray, np.ndarray, tuple[str, ...], list[np.ndarray]]) -> None:
    matrix, weights, ids, rows = before
    np.testing.assert_array_equal(buffer.matrix, matrix)
    np.testing.assert_array_equal(buffer.weights, weights)
    assert buffer.device_ids == ids
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(buffer.row(i), row)


# --- Flattener -------------------------------------------------------------------------------


def test_flattener_follows_manifest_order_and_skips_nothing() -> None:
    flat = Flattener.from_specs([spec("b", (2,)), spec("a", (1, 2))])
    vector = flat.flatten({"a": np.array([[3.0, 4.0]], np.float32), "b": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(vector, [1.0, 2.0, 3.0, 4.0])  # "b" first: manifest order, not sorted
    assert flat.expected == {"b": (2,), "a": (1, 2)}


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text("abcxyz.", min_size=1, max_size=6),
        st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 2**32 - 1),
)
def test_flatten_unflatten_round_trips(shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    flat = Flattener(shapes)
    rng = np.random.default_rng(seed)
    values = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    vector = flat.flatten(values)
    assert vector.shape == (sum(int(np.prod(s)) for s in shapes.values()),)
    back = flat.unflatten(vector)
    assert list(back) == list(shapes)
    for name in shapes:
        np.testing.assert_array_equal(back[name], values[name])
        assert back[name].shape == shapes[name]
    if vector.size:
        vector[:] = 123.0  # unflatten returned copies, not views
        assert all(not (arr == 123.0).any() for arr in back.values() if arr.size)


def test_flattener_refuses_mismatched_tensors() -> None:
    flat = Flattener(SHAPES)
    good = tensors(np.random.default_rng(0))
    with pytest.raises(ValueError, match="missing \\['scale'\\]"):
        flat.flatten({k: v for k, v in good.items() if k != "scale"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        flat.flatten({**good, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        flat.flatten({**good, "conv.b": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="twice"):
        Flattener([("a", (1,)), ("a", (2,))])


# --- capacity ---------------------------------------------------------------------------------


def test_buffer_size_is_fixed_by_max_bytes() -> None:
    config = BufferConfig(max_bytes=1000)
    rows = config.max_rows(DIM)  # each row: 10 * 4 + 8 bytes
    assert rows == 1000 // 48
    buffer = UpdateBuffer(Flattener(SHAPES), rows=rows, config=config)
    assert buffer.nbytes == rows * 48 <= 1000
    assert buffer._data.nbytes + buffer._weights.nbytes == buffer.nbytes
    with pytest.raises(ValueError, match=f"at most {rows} fit"):
        UpdateBuffer(Flattener(SHAPES), rows=rows + 1, config=config)
    half = BufferConfig(max_bytes=1000, dtype="float16")
    assert half.max_rows(DIM) == (1000 - 4 * DIM) // (2 * DIM + 12) > rows  # float16 fits more rows


def test_buffer_refuses_beyond_its_cap_and_keeps_what_it_holds() -> None:
    rng = np.random.default_rng(2)
    buffer = UpdateBuffer(Flattener(SHAPES), rows=3)
    sent = [tensors(rng) for _ in range(3)]
    for i, values in enumerate(sent):
        assert buffer.add_encoded(f"d{i}", payload(values), 10.0 + i) == i
    before = snapshot(buffer)
    with pytest.raises(BufferFull, match=r"3 of 3 rows.*'d3' refused") as info:
        buffer.add_encoded("d3", payload(tensors(rng, 1e6)), 1.0)
    assert info.value.code == "buffer_full"
    with pytest.raises(BufferFull):
        buffer.add("d4", tensors(rng), 1.0)
    assert_same(buffer, before)
    for i, values in enumerate(sent):
        np.testing.assert_array_equal(buffer.row(i), Flattener(SHAPES).flatten(values))
    np.testing.assert_array_equal(buffer.weights, [10.0, 11.0, 12.0])


def test_bad_updates_leave_the_buffer_as_it_was() -> None:
    rng = np.random.default_rng(3)
    buffer = UpdateBuffer(Flattener(SHAPES), rows=4)
    buffer.add("d0", tensors(rng), 1.0)
    before = snapshot(buffer)
    good = payload(tensors(rng, 50.0))
    with pytest.raises(MalformedMessage):
        buffer.add_encoded("d1", good[:-3], 1.0)  # truncated
    with pytest.raises(ContractViolation):
        buffer.add_encoded("d1", payload({"conv.w": np.zeros((2, 3), np.float32)}), 1.0)  # lacks tensors
    with pytest.raises(ValueError, match="already has"):
        buffer.add_encoded("d0", good, 1.0)
    with pytest.raises(ValueError, match="positive"):
        buffer.add_encoded("d1", good, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        buffer.add("d1", {**tensors(rng), "scale": np.array(np.nan, np.float32)}, 1.0)
    assert_same(buffer, before)
    assert buffer.add_encoded("d1", good, 2.0) == 1  # the slot it did not take is still free


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["ok", "truncated", "duplicate", "nan"]), min_size=1, max_size=12), st.integers(1, 6))
def test_any_sequence_of_good_and_bad_adds_keeps_exactly_the_good_ones(kinds: list[str], rows: int) -> None:
    rng = np.random.default_rng(len(kinds) * 7 + rows)
    flat = Flattener(SHAPES)
    buffer = UpdateBuffer(flat, rows=rows)
    kept: list[np.ndarray] = []
    for i, kind in enumerate(kinds):
        values = tensors(rng)
        try:
            if kind == "ok":
                buffer.add_encoded(f"d{i}", payload(values), 1.0 + i)
            elif kind == "truncated":
                buffer.add_encoded(f"d{i}", payload(values)[:-1], 1.0)
            elif kind == "duplicate":
                if not buffer.device_ids:
                    continue
                buffer.add(buffer.device_ids[-1], values, 1.0)
            else:
                buffer.add(f"d{i}", {**values, "conv.b": np.array([1.0, np.inf, 0.0], np.float32)}, 1.0)
        except (BufferFull, ValueError, MalformedMessage):
            continue
        kept.append(flat.flatten(values))
    assert len(buffer) == len(kept) == min(rows, kinds.count("ok"))
    for i, row in enumerate(kept):
        np.testing.assert_array_equal(buffer.row(i), row)


# --- contents ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk:0.3"])
def test_encoded_updates_decode_into_rows_exactly_like_decode_update(codec: str) -> None:
    flat = Flattener(SHAPES)
    buffer = UpdateBuffer(flat, rows=2)
    data = payload(tensors(np.random.default_rng(4)), codec)
    buffer.add_encoded("d0", data, 1.0)
    np.testing.assert_array_equal(buffer.row(0), flat.flatten(decode_update(data, flat.expected)))


def test_float16_rows_stay_within_the_documented_error_and_never_overflow() -> None:
    flat = Flattener({"w": (400,)})
    buffer = UpdateBuffer(flat, rows=3, config=BufferConfig(dtype="float16"))
    rng = np.random.default_rng(5)
    rows = [
        rng.normal(size=400).astype(np.float32) * 1e-3,
        (rng.normal(size=400) * np.logspace(-9, 6, 400)).astype(np.float32),  # beyond float16's 65504
        np.zeros(400, np.float32),
    ]
    for i, row in enumerate(rows):
        buffer.add(f"d{i}", {"w": row}, 1.0)
    assert buffer.matrix.dtype == np.float16
    for i, row in enumerate(rows):
        got = buffer.row(i)
        assert np.isfinite(got).all()
        bound = 2.0**-11 * np.abs(row) * (1 + 1e-6) + 2.0**-25 * np.abs(row).max() * (1 + 1e-6) + 1e-45
        assert (np.abs(got - row) <= bound).all(), i
    assert buffer.row(1)[-1] == pytest.approx(rows[1][-1], rel=2**-11)


def test_aggregate_runs_the_rule_on_the_stored_rows_and_reports_device_ids() -> None:
    rng = np.random.default_rng(6)
    buffer = UpdateBuffer(Flattener(SHAPES), rows=5, config=BufferConfig(work_bytes=64))
    for i in range(5):
        buffer.add_encoded(f"dev-{i}", payload(tensors(rng)), 1.0)
    result = buffer.aggregate(Median())
    np.testing.assert_array_equal(result.delta, coordinate_median(buffer.matrix.astype(np.float32)).delta)
    assert buffer.ids(result.report.selected) == tuple(f"dev-{i}" for i in range(5))
    with pytest.raises(ValueError, match="read-only"):
        buffer.matrix[0, 0] = 1.0
    buffer.clear()
    assert len(buffer) == 0
    with pytest.raises(ValueError, match="empty"):
        buffer.aggregate(Median())
    buffer.add("dev-0", tensors(rng), 1.0)  # the id is free again after clear()
