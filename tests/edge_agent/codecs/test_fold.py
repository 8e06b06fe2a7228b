"""The blocked fold (edge_agent.codecs.fold): block boundaries, group folds, all-or-nothing."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from edge_agent.codecs import CodecSpec, accumulate_update, encode_update
from edge_agent.codecs.decode import fold_updates, parse_update, prepare_update
from edge_agent.codecs.fold import GEMV_ELEMENTS, Folder, Term, block_length
from edge_agent.errors import MalformedMessage

BLOCK, SINGLE = 8, 5  # tiny blocks, so small tensors cross many block boundaries


def _reference(acc: np.ndarray, terms: list[Term]) -> np.ndarray:
    """``acc + sum(factors * values)`` the plain way: whole tensors, float64, one update at a time."""
    want = acc.copy()
    for term in terms:
        values = term.values.astype(np.float64)
        if isinstance(term.factors, np.ndarray) and len(term.factors) > 1:
            want += (values.reshape(len(term.factors), -1) * term.factors[:, None]).reshape(-1)
        else:
            want += values * float(np.asarray(term.factors).reshape(-1)[0])
    return want


@pytest.mark.parametrize("size", [0, 1, SINGLE - 1, SINGLE, SINGLE + 1, BLOCK, BLOCK + 1, 3 * BLOCK + 2, 101])
def test_single_term_is_bit_identical_to_the_whole_tensor_fold(size: int) -> None:
    rng = np.random.default_rng(size)
    values = rng.standard_normal(size).astype(np.float32)
    acc = rng.standard_normal(size)
    want = acc + np.multiply(values, 3.7, dtype=np.float64)
    Folder(block=BLOCK, single_block=SINGLE).fold(acc, [Term(values, 3.7)])
    np.testing.assert_array_equal(acc, want)


@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3])
@pytest.mark.parametrize("count", [2, 3, 8])
def test_group_fold_matches_the_sum_of_single_folds(size: int, count: int) -> None:
    rng = np.random.default_rng(size * 10 + count)
    terms = [Term(rng.standard_normal(size).astype(np.float32), float(rng.uniform(1, 500))) for _ in range(count - 1)]
    terms.append(Term(rng.integers(-127, 128, size).astype(np.int8), float(rng.uniform(1e-4, 1e-2))))
    acc = rng.standard_normal(size)
    want = _reference(acc, terms)
    Folder(block=BLOCK, single_block=SINGLE).fold(acc, terms)
    np.testing.assert_allclose(acc, want, rtol=1e-14, atol=1e-14 * float(np.abs(want).max()))


@pytest.mark.parametrize(("channels", "row"), [(4, 3), (3, BLOCK), (2, BLOCK + 3), (5, 2 * BLOCK + 1)])
@pytest.mark.parametrize("count", [1, 3])
def test_per_channel_factors_cross_blocks_row_aligned(channels: int, row: int, count: int) -> None:
    """Rows shorter than a block share one; rows longer than a block get a block each."""
    rng = np.random.default_rng(channels * 100 + row)
    terms = [
        Term(rng.integers(-127, 128, channels * row).astype(np.int8), rng.uniform(0.1, 2.0, channels))
        for _ in range(count)
    ]
    acc = rng.standard_normal(channels * row)
    want = _reference(acc, terms)
    folder = Folder(block=BLOCK, single_block=SINGLE)
    folder.fold(acc, terms)
    np.testing.assert_allclose(acc, want, rtol=1e-14)
    length = block_length(terms, BLOCK)
    assert length % row == 0 and length >= row


def test_mixed_scalar_and_per_channel_terms_of_one_tensor() -> None:
    rng = np.random.default_rng(3)
    terms = [
        Term(rng.standard_normal(12).astype(np.float32), 2.0),
        Term(rng.integers(-127, 128, 12).astype(np.int8), np.array([0.5, 0.25, 0.125])),
    ]
    acc = np.zeros(12)
    want = _reference(acc, terms)
    Folder(block=BLOCK, single_block=SINGLE).fold(acc, terms)
    np.testing.assert_allclose(acc, want, rtol=1e-15)


def test_scratch_is_allocated_once_and_reused() -> None:
    folder = Folder(block=BLOCK, single_block=SINGLE)
    terms = [Term(np.ones(40, dtype=np.float32), 1.0), Term(np.ones(40, dtype=np.float32), 2.0)]
    folder.fold(np.zeros(40), terms)
    rows = folder._rows
    acc = np.zeros(40)
    folder.fold(acc, terms)
    assert folder._rows is rows and rows.shape == (2, BLOCK)
    np.testing.assert_array_equal(acc, np.full(40, 3.0))


def test_bad_block_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="block sizes"):
        Folder(block=0)


SHAPES = {"small": (3,), "scalar": (), "empty": (0, 4), "conv": (6, 2, 3, 3), "big": (5, 41)}


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int8-channel", "int4", "sign", "topk-int8"])
def test_grouped_updates_equal_the_weighted_sum_of_decodes(codec: str) -> None:
    spec = CodecSpec(codec, fraction=0.3) if "topk" in codec else CodecSpec(codec)
    payloads = [encode_update(_tensors(seed), spec, rng=np.random.default_rng(seed)) for seed in range(5)]
    weights = [3.0, 17.0, 0.5, 256.0, 1.0]
    acc = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    prepared = [prepare_update(p, acc, w, SHAPES) for p, w in zip(payloads, weights, strict=True)]
    fold_updates(prepared[:3], acc, Folder(block=BLOCK, single_block=SINGLE))
    fold_updates(prepared[3:], acc, Folder(block=BLOCK, single_block=SINGLE))
    want = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for p, w in zip(payloads, weights, strict=True):  # the codecs' own whole-tensor float64 fold
        parsed = parse_update(p, SHAPES)
        for rec in parsed.records:
            parsed.record_codec(rec).accumulate(rec, want[rec.name], w)
    for name in SHAPES:
        np.testing.assert_allclose(acc[name], want[name], rtol=1e-12, atol=1e-15)


def test_nan_in_the_last_block_of_the_last_tensor_leaves_accumulators_untouched() -> None:
    """The payload is validated in full before the first block is folded."""
    tensors = _tensors(7)
    good = encode_update(tensors, CodecSpec("fp32"), rng=np.random.default_rng(0))
    acc = {name: np.random.default_rng(1).standard_normal(shape) for name, shape in SHAPES.items()}
    before = {name: value.copy() for name, value in acc.items()}
    folder = Folder(block=BLOCK, single_block=SINGLE)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        bad = good[:-4] + struct.pack("<f", bad_value)  # "big" is written last: its last element
        assert math.prod(SHAPES["big"]) > 5 * SINGLE  # ... sits in a later block than the first
        with pytest.raises(MalformedMessage, match="non-finite"):
            accumulate_update(bad, acc, 2.0, SHAPES, folder=folder)
        for name in SHAPES:
            np.testing.assert_array_equal(acc[name], before[name])
    accumulate_update(good, acc, 2.0, SHAPES, folder=folder)
    np.testing.assert_allclose(acc["big"], before["big"] + 2.0 * tensors["big"].astype(np.float64), rtol=1e-15)


def test_strided_accumulators_still_fold_correctly() -> None:
    payloads = [
        encode_update({"w": _tensors(s)["big"]}, CodecSpec("int8"), rng=np.random.default_rng(s)) for s in (1, 2)
    ]
    acc = {"w": np.asfortranarray(np.ones((5, 41)))}
    prepared = [prepare_update(p, acc, 2.0, {"w": (5, 41)}) for p in payloads]
    fold_updates(prepared, acc, Folder(block=BLOCK, single_block=SINGLE))
    want = np.ones((5, 41))
    for p in payloads:
        parsed = parse_update(p)
        parsed.record_codec(parsed.records[0]).accumulate(parsed.records[0], want, 2.0)
    np.testing.assert_allclose(acc["w"], want, rtol=1e-12)


def test_held_bytes_counts_the_payload_data_kept_alive() -> None:
    tensors = _tensors(0)
    acc = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    fp32 = prepare_update(encode_update(tensors, CodecSpec("fp32"), rng=np.random.default_rng(0)), acc, 1.0, SHAPES)
    int8 = prepare_update(encode_update(tensors, CodecSpec("int8"), rng=np.random.default_rng(0)), acc, 1.0, SHAPES)
    elements = sum(math.prod(shape) for shape in SHAPES.values())
    assert fp32.held_bytes == 4 * elements
    assert int8.held_bytes == elements + 4 * len(SHAPES)  # one float32 scale per tensor


def test_group_blocks_stay_under_the_single_threaded_gemv_size() -> None:
    terms = [Term(np.full(70_000, float(i), dtype=np.float32), 0.5) for i in range(16)]
    folder = Folder()
    acc = np.zeros(70_000)
    folder.fold(acc, terms)
    assert folder._rows.shape[0] * folder._rows.shape[1] <= GEMV_ELEMENTS
    np.testing.assert_array_equal(acc, np.full(70_000, 0.5 * sum(range(16))))
