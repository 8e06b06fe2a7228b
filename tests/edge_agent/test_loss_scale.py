"""DynamicLossScaler: torch.cuda.amp.GradScaler's update rule as a pure value object."""

from __future__ import annotations

import pytest

from edge_agent.errors import ConfigError
from edge_agent.runtime.loss_scale import DynamicLossScaler, LossScaleConfig


def _run(scaler: DynamicLossScaler, finites: list[bool]) -> DynamicLossScaler:
    for finite in finites:
        scaler = scaler.update(finite)
    return scaler


def test_defaults_are_gradscalers() -> None:
    scaler = DynamicLossScaler.initial()
    assert scaler.scale == 65536.0
    assert (scaler.config.growth_factor, scaler.config.backoff_factor, scaler.config.growth_interval) == (
        2.0,
        0.5,
        2000,
    )


def test_overflow_halves_scale_and_resets_growth() -> None:
    scaler = _run(DynamicLossScaler.initial(LossScaleConfig(growth_interval=3)), [True, True])
    assert scaler.growth_tracker == 2

    after = scaler.update(False)

    assert after.scale == scaler.scale * 0.5
    assert after.growth_tracker == 0
    assert (after.skipped, after.taken) == (1, 2)


def test_growth_after_interval_of_finite_steps() -> None:
    scaler = DynamicLossScaler.initial(LossScaleConfig(init_scale=8.0, growth_interval=3))

    scaler = _run(scaler, [True, True])
    assert scaler.scale == 8.0
    scaler = scaler.update(True)
    assert (scaler.scale, scaler.growth_tracker) == (16.0, 0)
    scaler = _run(scaler, [True, True, False, True, True])  # overflow restarts the count
    assert (scaler.scale, scaler.growth_tracker) == (8.0, 2)


def test_matches_torch_gradscaler_sequence() -> None:
    # Expected values from torch.amp.GradScaler._amp_update_scale_ semantics, worked by hand:
    # growth_interval 2, init 4: F -> 2, T, T -> 4, T, F -> 2, T, T -> 4, T, T -> 8
    scaler = DynamicLossScaler.initial(LossScaleConfig(init_scale=4.0, growth_interval=2))
    scales = []
    for finite in [False, True, True, True, False, True, True, True, True]:
        scaler = scaler.update(finite)
        scales.append(scaler.scale)
    assert scales == [2.0, 2.0, 4.0, 4.0, 2.0, 2.0, 4.0, 4.0, 8.0]


def test_scale_stops_at_min_scale_and_reports_exhaustion() -> None:
    scaler = DynamicLossScaler.initial(LossScaleConfig(init_scale=4.0, min_scale=1.0))

    scaler = _run(scaler, [False, False, False, False])

    assert scaler.scale == 1.0
    assert scaler.is_exhausted(False)
    assert not scaler.is_exhausted(True)
    assert not DynamicLossScaler.initial().is_exhausted(False)


def test_updates_do_not_mutate() -> None:
    scaler = DynamicLossScaler.initial()
    scaler.update(False)
    assert (scaler.scale, scaler.skipped) == (65536.0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_scale": 0.0},
        {"init_scale": float("inf")},
        {"growth_factor": 1.0},
        {"backoff_factor": 1.0},
        {"backoff_factor": 0.0},
        {"growth_interval": 0},
        {"min_scale": 0.0},
        {"init_scale": 2.0, "min_scale": 4.0},
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LossScaleConfig(**kwargs)  # type: ignore[arg-type]
