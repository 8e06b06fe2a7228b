"""accumulate_update: the server's all-or-nothing fold into float64 accumulators."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.codecs import CODEC_NAMES, CodecSpec, UpdateInfo, accumulate_update, decode_update, encode_update
from edge_agent.errors import ContractViolation, MalformedMessage, ProtocolError, UnsupportedVersion
from tests.edge_agent.codecs.helpers import CNN_SHAPES, cnn_delta, f32, payload, record, varint


def _zeros(shapes: dict[str, tuple[int, ...]] = CNN_SHAPES) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape) for name, shape in shapes.items()}


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_accumulate_equals_weighted_sum_of_decodes(name: str) -> None:
    spec = CodecSpec(name, fraction=0.05, zstd=True) if "topk" in name else CodecSpec(name, zstd=True)
    rng = np.random.default_rng(5)
    payloads = [encode_update(cnn_delta(seed), spec, rng=rng) for seed in range(3)]
    weights = [0.5, 0.25, 2.0]
    acc = _zeros()
    infos = [accumulate_update(p, acc, w, CNN_SHAPES) for p, w in zip(payloads, weights, strict=True)]
    want = _zeros()
    for p, w in zip(payloads, weights, strict=True):
        for key, value in decode_update(p, CNN_SHAPES).items():
            want[key] += w * value.astype(np.float64)
    for key in CNN_SHAPES:
        np.testing.assert_allclose(acc[key], want[key], rtol=1e-6, atol=1e-9)
    assert infos[0] == UpdateInfo(name, 10, 6186, len(payloads[0]), payloads[0][6] == 1)


def test_non_contiguous_accumulators() -> None:
    delta = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5}
    for name in ("topk", "int8-channel", "fp32"):
        spec = CodecSpec(name, fraction=0.5) if name == "topk" else CodecSpec(name)
        p = encode_update(delta, spec, rng=np.random.default_rng(0))
        acc = {"w": np.asfortranarray(np.ones((3, 4)))}
        accumulate_update(p, acc, 3.0, {"w": (3, 4)})
        np.testing.assert_allclose(acc["w"], 1 + 3 * decode_update(p)["w"], rtol=1e-6)


def _bad_payloads() -> list[tuple[bytes, type[ProtocolError], str]]:
    """Payloads whose first tensor is fine and whose problem sits in or after the last one."""
    good_a = record("a", (2,), "fp32", f32(1.0, 2.0))
    good_b = record("b", (3,), "fp32", f32(1.0, 2.0, 3.0))
    topk_a = record("a", (2,), "topk", varint(1), b"\x00", f32(1.0))
    return [
        (
            payload("fp32", good_a, record("b", (3,), "fp32", f32(1.0, 2.0, float("nan")))),
            MalformedMessage,
            "non-finite",
        ),
        (
            payload("fp32", good_a, record("b", (3,), "fp32", f32(1.0, 2.0))),
            MalformedMessage,
            "truncated in tensor 'b'",
        ),
        (payload("fp32", good_a, good_b) + b"\0", MalformedMessage, "1 trailing bytes"),
        (
            payload("fp32", good_a, record("b", (4,), "fp32", f32(1.0, 2.0, 3.0, 4.0))),
            ContractViolation,
            r"'b': shape \(4,\) != expected \(3,\)",
        ),
        (payload("fp32", good_a), ContractViolation, r"lacks tensors \['b'\]"),
        (
            payload("fp32", good_a, good_b, record("c", (1,), "fp32", f32(1))),
            ContractViolation,
            "unexpected tensor 'c'",
        ),
        (
            payload("topk", topk_a, record("b", (3,), "topk", varint(1), b"\x03", f32(1.0))),
            MalformedMessage,
            "'b': top-k index 3 out of range",
        ),
        (
            payload(
                "int8",
                record("a", (2,), "int8", f32(1.0), b"\x01\x02"),
                record("b", (3,), "int8", f32(-1.0), b"\x01" * 3),
            ),
            MalformedMessage,
            "'b': scale -1.0 is not a finite number",
        ),
        (payload("fp32", good_a, good_b, version=2), UnsupportedVersion, "version 2"),
        # per-record codec ids and positional references
        (
            payload("fp32", good_a, record("b", (3,), 10, f32(1.0, 2.0, 3.0))),
            UnsupportedVersion,
            "'b': unknown codec id 10",
        ),
        (
            payload(
                "topk-int8",
                record("a", (2,), "int8", f32(1.0), b"\x01\x02"),
                record("b", (3,), "sign", f32(1.0), b"\x05"),
            ),
            ContractViolation,
            "'b' uses codec 'sign' inside a topk-int8 update",
        ),
        (payload("fp32", good_a, record(2, (3,), "fp32", f32(1.0, 2.0, 3.0))), ContractViolation, "position 2 beyond"),
        (
            payload("fp32", good_a, record(0, (2,), "fp32", f32(1.0, 2.0))),
            MalformedMessage,
            "duplicate tensor name 'a'",
        ),
        (
            payload("fp32", record(0, (2,), "fp32", f32(1.0, 2.0)), b"\0"),
            MalformedMessage,
            "truncated in tensor 1 position",
        ),
    ]


@pytest.mark.parametrize(("bad", "error", "match"), _bad_payloads())
def test_bad_payload_leaves_accumulators_untouched(bad: bytes, error: type[ProtocolError], match: str) -> None:
    shapes = {"a": (2,), "b": (3,)}
    acc = {"a": np.full(2, 7.0), "b": np.full(3, 7.0)}
    with pytest.raises(error, match=match):
        accumulate_update(bad, acc, 1.0, shapes)
    assert acc["a"].tolist() == [7.0, 7.0] and acc["b"].tolist() == [7.0, 7.0, 7.0]


def test_caller_errors_are_value_errors_and_modify_nothing() -> None:
    p = payload("fp32", record("a", (2,), "fp32", f32(1.0, 2.0)), record("b", (1,), "fp32", f32(3.0)))
    shapes = {"a": (2,), "b": (1,)}
    accumulators: list[dict[str, np.ndarray]] = [
        {"a": np.zeros(2)},
        {"a": np.zeros(2), "b": np.zeros(1, np.float32)},
        {"a": np.zeros(2), "b": np.zeros((1, 1))},
    ]
    for acc in accumulators:
        before = {key: value.copy() for key, value in acc.items()}
        with pytest.raises(ValueError, match="accumulator 'b'"):
            accumulate_update(p, acc, 1.0, shapes)
        assert all((acc[key] == before[key]).all() for key in acc)
    with pytest.raises(ValueError, match="weight"):
        accumulate_update(p, {"a": np.zeros(2), "b": np.zeros(1)}, float("nan"), shapes)
    acc = {"a": np.zeros(2), "b": np.zeros(1)}
    assert accumulate_update(p, acc, 2.0, shapes).tensors == 2  # the payload itself is fine
    assert acc["a"].tolist() == [2.0, 4.0] and acc["b"].tolist() == [6.0]


def test_accumulate_accepts_memoryview_and_reports_info() -> None:
    p = encode_update(cnn_delta(0), CodecSpec.parse("topk-int8:0.01"), rng=np.random.default_rng(0))
    acc = _zeros()
    info = accumulate_update(memoryview(p), acc, 1.0, CNN_SHAPES)
    assert info == UpdateInfo("topk-int8", 10, 6186, len(p), False)
    assert sum(int(np.count_nonzero(value)) for value in acc.values()) <= 69
