"""How hard the agent works while training: threads, batch size and duty cycle. Pure functions.

The numbers come from :class:`~edge_agent.device.policy.LoadLimits` (``[policy.load]``) and the
device's readings; the runtime applies them (``intra_op_num_threads``, the batch size it trains
with, a sleep after each step).
"""

from __future__ import annotations

import math

from edge_agent.device.policy import LoadLimits


def ort_threads(limits: LoadLimits, cpu_count: int | None) -> int:
    """onnxruntime intra-op threads: ``limits.threads`` capped at the core count, else half the cores.

    ``cpu_count`` is ``os.cpu_count()`` (``None`` when unknown: one core is assumed). More threads
    than cores only adds contention, so a configured count is capped; at least 1.
    """
    cores = cpu_count if cpu_count is not None and cpu_count > 0 else 1
    if limits.threads is not None:
        return min(limits.threads, cores)
    return max(1, cores // 2)


def adapt_batch_size(
    requested: int,
    *,
    bytes_per_example: int,
    fixed_bytes: int,
    available_bytes: int,
    headroom_bytes: int,
    minimum: int = 2,
) -> int | None:
    """The largest batch size <= ``requested`` whose working set fits; ``None`` if not even ``minimum`` does.

    The working set of a batch of ``b`` is ``fixed_bytes + b * bytes_per_example`` (parameters,
    optimizer state and the session's arena in ``fixed_bytes``), and it must leave ``headroom_bytes``
    of ``available_bytes`` free (pass the policy's ``min_free_memory_mb``, the same margin
    eligibility demands). It is sized for ``b + 1`` examples because ``runtime.trainer.batch_slices``
    folds a trailing single example into the last batch.

    ``None`` rather than an exception or a too-large ``minimum``: not fitting is an expected state
    (the device is busy), not an error, and the type makes the caller handle it, normally by
    reporting the device not eligible and trying again later. ``minimum`` (2: BatchNorm cannot
    normalise a single example) is lowered to ``requested`` when that is smaller.
    """
    if requested < 1 or minimum < 1:
        raise ValueError(f"batch sizes must be >= 1, got requested={requested}, minimum={minimum}")
    if min(bytes_per_example, fixed_bytes, headroom_bytes) < 0:
        raise ValueError("byte counts must be >= 0")
    spare = available_bytes - headroom_bytes - fixed_bytes
    if spare < 0:
        return None
    fits = requested if bytes_per_example == 0 else spare // bytes_per_example - 1
    batch = min(requested, fits)
    return batch if batch >= min(minimum, requested) else None


def throttle_sleep(step_seconds: float, cpu_share: float) -> float:
    """Seconds to sleep after a step of ``step_seconds`` so that compute / (compute + sleep) <= ``cpu_share``."""
    if not (math.isfinite(step_seconds) and step_seconds >= 0):
        raise ValueError(f"step time must be a finite number >= 0, got {step_seconds}")
    if not 0 < cpu_share <= 1:
        raise ValueError(f"cpu share must be in (0, 1], got {cpu_share}")
    return step_seconds * (1 - cpu_share) / cpu_share
