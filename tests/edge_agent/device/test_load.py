"""Threads, batch size and duty cycle while training."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.device.load import adapt_batch_size, ort_threads, throttle_sleep
from edge_agent.device.policy import LoadLimits

MB = 1 << 20


@pytest.mark.parametrize(("cpu_count", "threads"), [(8, 4), (4, 2), (3, 1), (2, 1), (1, 1), (0, 1), (None, 1)])
def test_by_default_onnxruntime_gets_half_the_cores_and_at_least_one(cpu_count: int | None, threads: int) -> None:
    assert ort_threads(LoadLimits(), cpu_count) == threads


def test_a_configured_thread_count_is_capped_at_the_cores() -> None:
    assert ort_threads(LoadLimits(threads=3), 8) == 3
    assert ort_threads(LoadLimits(threads=16), 4) == 4
    assert ort_threads(LoadLimits(threads=2), None) == 1


def test_the_requested_batch_is_kept_when_it_fits() -> None:
    batch = adapt_batch_size(
        32, bytes_per_example=MB, fixed_bytes=100 * MB, available_bytes=400 * MB, headroom_bytes=128 * MB
    )

    assert batch == 32


def test_the_batch_shrinks_to_fit_with_room_for_a_folded_trailing_example() -> None:
    # 150 MB spare at 10 MB per example: 15 examples, so batches of 14 (+ 1 folded in).
    batch = adapt_batch_size(
        32, bytes_per_example=10 * MB, fixed_bytes=100 * MB, available_bytes=378 * MB, headroom_bytes=128 * MB
    )

    assert batch == 14


def test_none_when_not_even_the_minimum_fits() -> None:
    common = {"bytes_per_example": 10 * MB, "fixed_bytes": 100 * MB, "headroom_bytes": 128 * MB}

    assert adapt_batch_size(32, available_bytes=257 * MB, **common) is None  # room for 2: batch of 1 only
    assert adapt_batch_size(32, available_bytes=258 * MB, **common) == 2
    assert adapt_batch_size(32, available_bytes=200 * MB, **common) is None  # not even the fixed part
    assert adapt_batch_size(32, available_bytes=257 * MB, minimum=1, **common) == 1


def test_a_request_below_the_minimum_is_served_as_is() -> None:
    batch = adapt_batch_size(1, bytes_per_example=MB, fixed_bytes=0, available_bytes=10 * MB, headroom_bytes=0)

    assert batch == 1


def test_nonsense_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        adapt_batch_size(0, bytes_per_example=1, fixed_bytes=0, available_bytes=10, headroom_bytes=0)
    with pytest.raises(ValueError):
        adapt_batch_size(4, bytes_per_example=-1, fixed_bytes=0, available_bytes=10, headroom_bytes=0)
    with pytest.raises(ValueError):
        throttle_sleep(1.0, 0.0)
    with pytest.raises(ValueError):
        throttle_sleep(-1.0, 0.5)


@given(
    requested=st.integers(1, 512),
    per_example=st.integers(0, 10**8),
    fixed=st.integers(0, 10**9),
    available=st.integers(0, 10**10),
    headroom=st.integers(0, 10**9),
    minimum=st.integers(1, 8),
)
def test_the_batch_is_the_largest_that_fits(
    requested: int, per_example: int, fixed: int, available: int, headroom: int, minimum: int
) -> None:
    batch = adapt_batch_size(
        requested,
        bytes_per_example=per_example,
        fixed_bytes=fixed,
        available_bytes=available,
        headroom_bytes=headroom,
        minimum=minimum,
    )

    def fits(b: int) -> bool:
        return fixed + (b + 1) * per_example + headroom <= available

    if batch is None:
        assert not fits(min(minimum, requested))
    else:
        assert min(minimum, requested) <= batch <= requested
        assert fits(batch)
        assert batch == requested or not fits(batch + 1)


def test_full_share_never_sleeps_and_half_share_sleeps_as_long_as_the_step() -> None:
    assert throttle_sleep(2.0, 1.0) == 0.0
    assert throttle_sleep(2.0, 0.5) == pytest.approx(2.0)
    assert throttle_sleep(1.0, 0.25) == pytest.approx(3.0)


@given(st.floats(1e-6, 1e4), st.floats(0.01, 1.0))
def test_the_duty_cycle_is_exactly_the_share(step: float, share: float) -> None:
    sleep = throttle_sleep(step, share)

    assert sleep >= 0
    assert step / (step + sleep) == pytest.approx(share, rel=1e-9)
