"""A rollout as the ops view shows it (pure: a JSON-ready dict).

Keys of :func:`rollout_status` (``active`` False and the rest null/empty when no rollout exists)::

    channel, active, rollout_id, version, baseline_version,
    status            "active" | "halted" | "rolled_back" | "complete"
    stage, stages     index of the current stage; the stages' percents
    percent           share of the fleet that should run ``version`` now
    reason            why the rollout is where it is (the last decision's reason)
    metric, canary_metric, baseline_metric   the watched metric and the means reported so far
    installs          {"ok": n, "failed": n} install reports of ``version``
    devices_per_version   {"<version>" | "other": online devices running it (by bundle digest)}
    blockers          why an active stage may not widen yet
    pins              {device class: version}
    decisions         [{"kind", "stage", "reason", "at"}], oldest first (kind: advance, halt,
                      rollback, complete; "at" is the server's wall clock)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from broker_server.rollout import RolloutState

__all__ = ["rollout_status"]


def rollout_status(
    channel: str,
    state: RolloutState | None,
    devices: Iterable[tuple[str, bool]],
    digests: Mapping[int, str | None],
    decisions: list[dict[str, Any]],
    now: float,
) -> dict[str, Any]:
    """``devices``: (bundle digest, online) of every device seen; ``digests``: version -> digest."""
    view: dict[str, Any] = {"channel": channel, "active": state is not None, "decisions": decisions}
    if state is None:
        return view
    plan = state.plan
    by_digest = {digest: version for version, digest in digests.items() if digest is not None}
    counts = Counter(str(by_digest.get(digest, "other")) for digest, online in devices if online)
    return view | {
        "rollout_id": plan.rollout_id,
        "version": plan.version,
        "baseline_version": plan.baseline_version,
        "status": state.status,
        "stage": state.stage,
        "stages": [stage.percent for stage in plan.stages],
        "percent": state.percent,
        "reason": state.reason,
        "metric": plan.metric,
        "canary_metric": _mean(state.canary_metrics.values()),
        "baseline_metric": plan.baseline_metric
        if plan.baseline_metric is not None
        else _mean(state.baseline_metrics.values()),
        "installs": {
            "ok": sum(1 for ok in state.installs.values() if ok),
            "failed": sum(1 for ok in state.installs.values() if not ok),
        },
        "devices_per_version": dict(sorted(counts.items())),
        "blockers": state.blockers(now) if state.status == "active" else [],
        "pins": dict(plan.pins),
    }


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return math.fsum(items) / len(items) if items else None
