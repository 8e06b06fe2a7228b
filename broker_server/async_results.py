"""Pure helpers of the asynchronous engine: refusals with their reason, buffer statistics, stored metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import numpy as np

from broker_server.fedbuff import BufferResult
from broker_server.server_config import RoundResult
from edge_agent.errors import ProtocolError

__all__ = ["UpdateRefused", "rebase_buffers", "remember_version", "result_metrics"]


class UpdateRefused(ProtocolError):
    """An asynchronous update FedBuff refused; ``code`` is the reason (stale, duplicate, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = reason


def result_metrics(result: RoundResult, sealed: BufferResult) -> dict[str, object]:
    """The version's stored metrics: the result, and each contribution's task, staleness and weight."""
    metrics: dict[str, object] = asdict(result)
    metrics["contributors"] = [
        {"device_id": c.device_id, "task_id": c.task_id, "staleness": c.staleness, "weight": c.weight}
        for c in sealed.contributors
    ]
    return metrics


def rebase_buffers(
    sealed: BufferResult,
    current: Mapping[str, np.ndarray],
    history: Mapping[int, Mapping[str, np.ndarray]],
    plain: frozenset[str],
) -> dict[str, np.ndarray]:
    """The sealed buffer's delta, with buffers (BatchNorm statistics: ``plain`` tensors) averaged as values.

    A device's statistics are ``w[base] + delta``; adding a stale delta to the current value can
    leave e.g. a negative running variance. So each plain tensor's delta gets
    ``Σ α_i (w[base_i] − w[current])`` (α_i: the contributions' weight shares), making the new value
    the weighted mean of the devices' own statistics. ``history`` maps a version to its plain
    tensors; a contribution whose base version is not in it (e.g. from before a restart) is not
    corrected.
    """
    delta = dict(sealed.mean_delta)
    for name in plain:
        fix = np.zeros(current[name].shape, dtype=np.float64)
        for c in sealed.contributors:
            base = history.get(c.model_version)
            if base is not None and c.model_version != sealed.base_version:
                fix += (c.weight / sealed.total_weight) * (base[name].astype(np.float64) - current[name])
        delta[name] = (delta[name].astype(np.float64) + fix).astype(delta[name].dtype)
    return delta


def remember_version(
    history: dict[int, dict[str, np.ndarray]],
    version: int,
    weights: Mapping[str, np.ndarray],
    plain: frozenset[str] | set[str] | tuple[str, ...],
    max_staleness: int,
) -> None:
    """Keep ``version``'s plain (BatchNorm) tensors for rebasing later stale updates; forget
    versions no accepted update can be based on any more (older than ``max_staleness``)."""
    history[version] = {name: np.array(weights[name]) for name in plain}
    for old in [v for v in history if v < version - max_staleness]:
        del history[old]
