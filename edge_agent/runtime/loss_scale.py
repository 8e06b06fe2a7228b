"""Dynamic loss scaling for fp16 train steps: pure value objects, no I/O, no onnxruntime.

An fp16 train-step graph takes an fp32 ``loss_scale`` input, multiplies the loss by it before the
backward pass (so small fp16 gradients do not flush to zero), divides the gradients by it in fp32
and reports ``finite``: every gradient is finite. The runtime then follows
``torch.cuda.amp.GradScaler``:

* not finite -> the step is **skipped** (the step's new parameters, buffers and optimizer state
  are discarded) and the scale is multiplied by ``backoff_factor``;
* finite -> the step is taken; after ``growth_interval`` finite steps in a row the scale is
  multiplied by ``growth_factor``.

:class:`DynamicLossScaler` is immutable: :meth:`~DynamicLossScaler.update` returns the next
scaler, so tests and callers can inject any starting state and replay decisions.

Defaults are GradScaler's (``init_scale`` 2**16, growth 2, backoff 0.5, interval 2000). 2**16
overflows on the first steps of many models (each overflow costs one skipped step and halves the
scale) but a device keeps its scaler across rounds (``OrtTrainer``), so the cost is paid once per
process; fp16's range tops out at 65504, so a larger initial scale would only waste more steps.
Unlike GradScaler, the scale never drops below ``min_scale``: a step that overflows at that scale
overflows in the forward pass or the data, and :class:`~edge_agent.errors.TrainingError` is the
honest answer, not an endless run of skipped steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edge_agent.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig:
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    #: a non-finite step at this scale (or below) is an error, not a skipped step
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0.0):
            raise ConfigError(f"loss scale: init_scale must be a positive number, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ConfigError(f"loss scale: growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ConfigError(f"loss scale: backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_interval < 1:
            raise ConfigError(f"loss scale: growth_interval must be >= 1, got {self.growth_interval}")
        if not 0.0 < self.min_scale <= self.init_scale:
            raise ConfigError(f"loss scale: min_scale must be in (0, init_scale], got {self.min_scale}")


@dataclass(frozen=True, kw_only=True)
class DynamicLossScaler:
    """Current loss scale and counters; :meth:`update` gives the next state. Start with :meth:`initial`."""

    config: LossScaleConfig
    scale: float
    #: finite steps since the last growth or backoff
    growth_tracker: int = 0
    #: steps skipped / taken since :meth:`initial` (telemetry)
    skipped: int = 0
    taken: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0.0):
            raise ConfigError(f"loss scale must be a positive number, got {self.scale}")

    @classmethod
    def initial(cls, config: LossScaleConfig | None = None) -> DynamicLossScaler:
        config = config or LossScaleConfig()
        return cls(config=config, scale=float(config.init_scale))

    def update(self, finite: bool) -> DynamicLossScaler:
        """The scaler after a step whose gradients were (not) ``finite``; see :attr:`exhausted`."""
        config = self.config
        if not finite:
            return replace(
                self,
                scale=max(self.scale * config.backoff_factor, config.min_scale),
                growth_tracker=0,
                skipped=self.skipped + 1,
            )
        tracker = self.growth_tracker + 1
        scale = self.scale
        if tracker >= config.growth_interval:
            grown = scale * config.growth_factor
            scale, tracker = (grown, 0) if math.isfinite(grown) else (scale, tracker)
        return replace(self, scale=scale, growth_tracker=tracker, taken=self.taken + 1)

    def is_exhausted(self, finite: bool) -> bool:
        """True when a non-finite step happened at ``min_scale``: lowering the scale cannot help."""
        return not finite and self.scale <= self.config.min_scale
