"""The group fold (edge_agent.codecs.partial): one-pass NaN/Inf rejection, precision bound, threads."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codecs import CodecSpec, encode_update
from edge_agent.codecs.decode import PreparedUpdate, fold_updates, parse_update, prepare_update
from edge_agent.codecs.fold import Folder, Term
from edge_agent.codecs.partial import GroupSum
from edge_agent.codecs.workers import FoldWorkers, default_workers
from edge_agent.errors import MalformedMessage, ProtocolError

SHAPES = {"conv": (6, 2, 3, 3), "bias": (7,), "fc": (5, 41), "scalar": ()}
ORDER = list(SHAPES)
BLOCK = 16  # tiny blocks: every tensor but the scalar spans several, and three workers get a run each
U32 = 2.0**-24


def _tensors(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def _payload(seed: int, codec: str = "fp32", scale: float = 0.01) -> bytes:
    return encode_update(_tensors(seed, scale), CodecSpec.parse(codec), rng=np.random.default_rng(seed), order=ORDER)


def _poison(payload: bytes, value: float, name: str, index: int) -> bytes:
    """``payload`` with element ``index`` of fp32 tensor ``name`` replaced by ``value``."""
    record = next(rec for rec in parse_update(payload, SHAPES).records if rec.name == name)
    at = record.data.__array_interface__["data"][0] - np.frombuffer(payload, np.uint8).__array_interface__["data"][0]
    at += 4 * index
    return payload[:at] + struct.pack("<f", value) + payload[at + 4 :]


def _zeros() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape) for name, shape in SHAPES.items()}


def _prepare(payload: bytes, weight: float) -> PreparedUpdate:
    return prepare_update(payload, _zeros(), weight, SHAPES, defer_finite=True)


def _group(workers: int = 1) -> GroupSum:
    return GroupSum(SHAPES, workers=FoldWorkers(workers), block=BLOCK)


def _commit(group: GroupSum, workers: int = 1) -> dict[str, np.ndarray]:
    sums = _zeros()
    group.commit(sums, Folder(block=8, single_block=5, workers=FoldWorkers(workers)))
    return sums


def _exact(updates: list[tuple[bytes, float]]) -> dict[str, np.ndarray]:
    sums = _zeros()
    for payload, weight in updates:
        fold_updates([prepare_update(payload, sums, weight, SHAPES)], sums)
    return sums


def _magnitudes(updates: list[tuple[bytes, float]]) -> dict[str, np.ndarray]:
    total = _zeros()
    for payload, weight in updates:
        parsed = parse_update(payload, SHAPES)
        for rec in parsed.records:
            total[rec.name] += (
                np.abs(parsed.record_codec(rec).decode(rec).reshape(rec.shape).astype(np.float64)) * weight
            )
    return total


def _validation_error(payload: bytes) -> str:
    with pytest.raises(MalformedMessage) as caught:
        parse_update(payload, SHAPES)
    return caught.value.reason


def test_deferred_parse_skips_only_the_fp32_nan_pass() -> None:
    bad = _poison(_payload(1), float("nan"), "fc", 202)
    prepared = _prepare(bad, 2.0)  # accepted so far: the check is the caller's
    assert [rec.name for rec in prepared.unchecked] == ORDER
    with pytest.raises(MalformedMessage) as caught:
        prepared.check_finite()
    assert caught.value.reason == _validation_error(bad)
    int8 = _prepare(_payload(1, "int8"), 2.0)
    assert int8.unchecked == ()


@pytest.mark.parametrize(
    "damage",
    ["truncated", "trailing", "accumulator"],
)
def test_a_deferred_nan_is_still_the_error_a_doubly_bad_payload_gets(damage: str) -> None:
    bad = _poison(_payload(2), float("inf"), "fc", 150)  # before "scalar", the last tensor
    into = _zeros()
    if damage == "truncated":
        bad = bad[:-2]
    elif damage == "trailing":
        bad += b"\x00"
    else:
        into["fc"] = np.zeros((41, 5))
    errors = []
    for defer in (False, True):
        with pytest.raises((ProtocolError, ValueError)) as caught:
            prepare_update(bad, into, 1.0, SHAPES, defer_finite=defer)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] is MalformedMessage and "non-finite" in errors[0][1]


def test_fold_updates_checks_deferred_records_before_folding_any() -> None:
    sums = _zeros()
    before = {name: value.copy() for name, value in sums.items()}
    good, bad = _prepare(_payload(3), 1.0), _prepare(_poison(_payload(4), float("-inf"), "scalar", 0), 1.0)
    with pytest.raises(MalformedMessage, match="non-finite"):
        fold_updates([good, bad], sums)
    for name in SHAPES:
        np.testing.assert_array_equal(sums[name], before[name])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 1, 2, 3])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_bad_update_in_any_position_of_a_group_is_refused_and_the_group_loses_nothing(
    value: float, position: int, workers: int
) -> None:
    updates = [(_payload(10 + i), float(3 + 5 * i)) for i in range(4)]
    name, index = (("conv", 0), ("bias", 6), ("fc", 100), ("scalar", 0))[position]  # a tensor and block each
    bad = _poison(updates[position][0], value, name, index)
    group, clean = _group(workers), _group(workers)
    for index, (payload, weight) in enumerate(updates):
        if index == position:
            with pytest.raises(MalformedMessage) as caught:
                group.add(_prepare(bad, weight))
            assert caught.value.reason == _validation_error(bad)
            assert len(group) == position
        group.add(_prepare(payload, weight))
        clean.add(_prepare(payload, weight))
    got, want = _commit(group), _commit(clean)
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_full_group_is_within_the_float32_bound_of_the_exact_fold() -> None:
    rng = np.random.default_rng(5)
    updates = [
        (_payload(20 + i, scale=float(10.0 ** rng.uniform(-3, 3))), float(rng.uniform(1, 500))) for i in range(8)
    ]
    group = _group()
    for payload, weight in updates:
        group.add(_prepare(payload, weight))
    got, want, scale = _commit(group), _exact(updates), _magnitudes(updates)
    for name in SHAPES:
        assert np.all(np.abs(got[name] - want[name]) <= 9 * U32 * scale[name])
        assert not np.array_equal(got[name], want[name]) or name == "scalar"  # float32 sums, not the float64 fold


@pytest.mark.parametrize("codec", ["fp32", "int8", "int8-channel", "fp16", "int4", "topk"])
def test_one_member_is_folded_exactly(codec: str) -> None:
    payload = _payload(30, codec)
    group = _group()
    group.add(_prepare(payload, 7.25))
    got, want = _commit(group), _exact([(payload, 7.25)])
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], want[name])


def test_every_codec_mixes_in_one_group() -> None:
    codecs = ["fp32", "int8", "int8-channel", "fp16", "int4", "sign", "topk", "topk-int8", "int8"]
    updates = [(_payload(40 + i, codec), float(2 + i)) for i, codec in enumerate(codecs)]
    group = _group(workers=3)
    for payload, weight in updates:
        group.add(_prepare(payload, weight))
    got, want, scale = _commit(group, workers=3), _exact(updates), _magnitudes(updates)
    for name in SHAPES:
        assert np.all(np.abs(got[name] - want[name]) <= (len(updates) + 1) * U32 * scale[name])


def test_huge_finite_values_are_accepted_and_take_the_exact_fold() -> None:
    """w * x = 3e39 overflows float32: the dot check flags the block, the values are finite, so
    the update is kept and folded in float64, as before the partial existed."""
    huge = _payload(50, scale=1e30)
    updates = [(_payload(51), 2.0), (huge, 3e9), (_payload(52), 4.0)]
    group = _group()
    for payload, weight in updates:
        group.add(_prepare(payload, weight))
    assert len(group) == 3
    got, want = _commit(group), _exact(updates)
    for name in SHAPES:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12)


@pytest.mark.parametrize("weight", [1e-30, 1e30])
def test_weights_float32_cannot_carry_take_the_exact_fold(weight: float) -> None:
    updates = [(_payload(60), 1.0), (_payload(61), weight), (_payload(62), 1.0)]
    group = _group()
    bad = _poison(_payload(63), float("nan"), "conv", 77)
    with pytest.raises(MalformedMessage) as caught:
        group.add(_prepare(bad, weight))
    assert caught.value.reason == _validation_error(bad)
    for payload, w in updates:
        group.add(_prepare(payload, w))
    got, want, scale = _commit(group), _exact(updates), _magnitudes(updates)
    for name in SHAPES:
        assert np.all(np.abs(got[name] - want[name]) <= 4 * U32 * scale[name])
    big = {name: scale[name] for name in SHAPES}
    if weight > 1:  # the exact fold carries the huge term; the float32 sum of the others is lost beside it
        for name in SHAPES:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-15, atol=1e-14 * big[name].max())


def test_thread_count_does_not_change_a_bit() -> None:
    codecs = ["fp32", "int8", "fp32", "int8-channel", "topk", "fp32", "fp16", "int8"]
    updates = [(_payload(70 + i, codec), float(1 + 3 * i)) for i, codec in enumerate(codecs)]
    results = []
    for workers in (1, 2, 3):
        group = _group(workers)
        for payload, weight in updates:
            group.add(_prepare(payload, weight))
        results.append(_commit(group, workers))
    for other in results[1:]:
        for name in SHAPES:
            np.testing.assert_array_equal(other[name], results[0][name])


def test_folder_threads_do_not_change_a_bit() -> None:
    rng = np.random.default_rng(8)
    terms = [Term(rng.standard_normal(203).astype(np.float32), float(rng.uniform(1, 9))) for _ in range(3)]
    terms.append(Term(rng.integers(-127, 128, 203).astype(np.int8), 0.01))
    channel = [Term(rng.integers(-127, 128, 7 * 29).astype(np.int8), rng.uniform(0.1, 1, 7)) for _ in range(2)]
    for batch in (terms, terms[:1], channel):
        for method in ("fold", "fold32"):
            results = []
            for workers in (1, 3):
                acc = np.linspace(-1, 1, sum(1 for _ in range(batch[0].values.size)))
                getattr(Folder(block=8, single_block=5, workers=FoldWorkers(workers)), method)(acc, batch)
                results.append(acc)
            np.testing.assert_array_equal(results[0], results[1])


def test_strided_accumulators_get_the_group_sum() -> None:
    updates = [(_payload(80 + i), float(1 + i)) for i in range(3)]
    group = _group()
    for payload, weight in updates:
        group.add(_prepare(payload, weight))
    strided = {name: np.asfortranarray(np.zeros(shape)) for name, shape in SHAPES.items()}
    group.commit(strided, Folder())
    want, scale = _exact(updates), _magnitudes(updates)
    for name in SHAPES:
        assert np.all(np.abs(strided[name] - want[name]) <= 4 * U32 * scale[name])


def test_workers() -> None:
    assert 1 <= default_workers() <= 4
    with pytest.raises(ValueError, match="workers"):
        FoldWorkers(0)
    workers = FoldWorkers(3)
    finished: list[int] = []

    def fail() -> int:
        raise RuntimeError("job failed")

    def slow(value: int) -> int:
        finished.append(value)
        return value

    assert workers.run([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="job failed"):
        workers.run([fail, lambda: slow(5), lambda: slow(6)])
    assert sorted(finished) == [5, 6]  # the others ran to the end before the error surfaced
    workers.close()
    assert workers.run([lambda: 7, lambda: 8]) == [7, 8]
    workers.close()


def _outcome(action: Callable[[], object]) -> tuple[str, str]:
    try:
        action()
    except (ProtocolError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return "accepted", ""


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_deferring_the_check_never_changes_what_a_corrupted_payload_gets(data: st.DataObject) -> None:
    """The full validation and the group fold (deferred check) refuse the same payloads with the
    same error, and accept the same payloads."""
    base = _poison(_payload(90), float("nan"), "fc", 10) if data.draw(st.booleans()) else _payload(90)
    corrupted = bytearray(base)
    for _ in range(data.draw(st.integers(0, 3))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.sampled_from([0, 0x7F, 0x80, 0xC0, 0xFF, data.draw(st.integers(0, 255))]))
    raw = bytes(corrupted)
    full = _outcome(lambda: prepare_update(raw, _zeros(), 2.0, SHAPES))
    group = _group(workers=2)
    deferred = _outcome(lambda: group.add(prepare_update(raw, _zeros(), 2.0, SHAPES, defer_finite=True)))
    assert deferred == full
    assert len(group) == (1 if full[0] == "accepted" else 0)
