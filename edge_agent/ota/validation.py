"""An install's validation: the hook the model store runs and the metrics it reports (pure + one hook).

A ``validate(bundle)`` hook returns the new model's loss (a float), a mapping of metrics (which must
hold ``loss``, e.g. ``{"loss": 0.41, "accuracy": 0.88}``), or None (no metric). The store fails
the install when the loss is not finite; other non-finite values (accuracy of a regression) are
dropped. The metrics travel in the device's STATUS ``install`` report (docs/protocol.md §8.5),
where a staged rollout compares a canary's metric with the baseline's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from edge_agent.errors import BundleError, FedflockError
from edge_agent.ota.reports import InstalledModel
from edge_agent.runtime.bundle import Bundle

__all__ = [
    "VALIDATION_EXAMPLES",
    "Validate",
    "evaluation_validator",
    "replaced_model_metrics",
    "validation_metrics",
]

_log = logging.getLogger("fedflock.ota")

#: rows an :func:`evaluation_validator` evaluates (one batch: an install must stay cheap)
VALIDATION_EXAMPLES = 32

Validate = Callable[[Bundle], float | Mapping[str, float] | None]


def validation_metrics(value: float | Mapping[str, float] | None) -> dict[str, float]:
    """The metrics a validate hook returned; :class:`BundleError` when its loss is not finite."""
    if value is None:
        return {}
    raw: Mapping[str, Any] = value if isinstance(value, Mapping) else {"loss": value}
    if "loss" not in raw:
        raise BundleError(f"validation returned no loss (metrics: {sorted(raw)})")
    loss = float(raw["loss"])
    if not math.isfinite(loss):
        raise BundleError(f"validation produced a non-finite value ({loss})")
    metrics = {str(k): float(v) for k, v in raw.items()}
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def replaced_model_metrics(previous: InstalledModel | None, validate: Validate, *, device_id: str) -> dict[str, float]:
    """The replaced model's validation metrics on the same rows (a rollout's baseline); {} when
    there is none or it cannot be evaluated (logged: the install itself succeeded)."""
    if previous is None:
        return {}
    try:
        return validation_metrics(validate(Bundle.open(previous.path)))
    except FedflockError as exc:
        _log.warning("%s: cannot evaluate the previous model v%d: %s", device_id, previous.version, exc.reason)
        return {}


def evaluation_validator(x: Any, y: Any, *, examples: int = VALIDATION_EXAMPLES) -> Validate:
    """A hook evaluating a bundle's initial weights on the first ``examples`` rows of ``(x, y)``
    (the device's held-out validation rows when it has them): ``{"loss", "accuracy"}``."""
    rows_x, rows_y = x[:examples], y[:examples]

    def validate(bundle: Bundle) -> dict[str, float]:
        from edge_agent.runtime.trainer import OrtTrainer

        trainer = OrtTrainer.open(bundle)
        trainer.check_data(rows_x, rows_y)
        result = trainer.evaluate(bundle.initial_weights(), rows_x, rows_y)
        return {"loss": result.loss, "accuracy": result.accuracy}

    return validate
