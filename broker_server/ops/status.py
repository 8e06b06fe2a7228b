"""The JSON status document behind ``GET /api/status`` and the dashboard: pure functions, no I/O.

:func:`build_status` turns the server's state into plain JSON-ready data (schema 1)::

    {"schema": 1,
     "server": {"rounds": 20, "clients_per_round": 10, ..., "strategy": "fedavg", "bundle_digest": "..."},
     "model_version": 7,
     "device_counts": {"known": 12, "online": 9, "eligible": 8},
     "devices": [{"device_id", "online", "device_class", "agent_version", "num_examples",
                  "bundle_current", "eligible", "phase", "reasons": [{"code", "text", "source"}],
                  "last_seen", "last_seen_age_s"}, ...],                 # sorted by device id
     "rounds_total": 9,
     "rounds": [{"round", "outcome", "model_version", "selected", "reported", "failed",
                 "num_examples", "duration_s", "reason", "train_metrics", "test_loss",
                 "test_accuracy"}, ...],                                # the last N, oldest first
     "rollout": null | {"rollout_id", "version", "baseline_version", "status", "stage", "stages",
                        "percent", "reason", "installs": {"ok", "failed"}, "metric",
                        "canary_mean", "canary_reports", "baseline_mean", "baseline_reports",
                        "blockers"}},
     "trust": null | {"quarantined": [{"device_id", "reason", "score", "strikes"}, ...],
                      "recent": [{"device_id", "round", "action", "reason", "score"}, ...]},
     "privacy": null | {"mode": "central", "epsilon_spent", "epsilon_budget", "delta",
                        "rounds_charged", "rounds_remaining", "noise_multiplier", "clip_norm",
                        "sampling_rate", "clients_per_round", "population", "adaptive_clipping",
                        "exhausted"}}

``privacy`` is ``FederatedServer.privacy`` (central DP's accountant; null when DP is off).
``clusters`` is ``FederatedServer.cluster_status()`` (clustered FL; null when off): per cluster
``{"cluster_id", "members", "version", "parent": null | {"cluster_id", "version"}, "round",
"test_accuracy"}``, by id (``members`` counts assigned devices; the root also trains unknown ones).

A device is ``eligible`` exactly as :meth:`DeviceRegistry.eligible` decides: online, holding the
bundle the server trains, and not having reported that it cannot train now. ``reasons`` says why
not: ``source: "server"`` for what the server sees (offline, another bundle), ``source: "device"``
for the checks the device reported failing in its STATUS. Device-reported text is untrusted: it is
clipped here and the dashboard inserts it as text, never as HTML.

With tiered trust on, a quarantined device is not ``eligible`` (the server does not select it)
and its reasons include ``{"code": "quarantined", "text": <the quarantine's reason>, "source":
"server"}``; ``trust`` lists the quarantined devices and the newest trust decisions (oldest
first). ``trust`` is null when tiered trust is off.

``last_seen`` is on the clock the registry was fed (the server's monotonic clock by default), so
``now`` must come from that same clock; ``last_seen_age_s`` is what people read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from broker_server.registry import DeviceRecord
from broker_server.robust import Reputation, TrustDecision
from broker_server.rollout import RolloutState
from broker_server.server_config import RoundResult, ServerConfig

__all__ = ["SCHEMA", "build_status", "config_view", "device_view", "rollout_view", "round_view", "trust_view"]

SCHEMA = 1
#: device-reported reasons kept per device, and characters kept per code / text
MAX_REASONS = 16
MAX_CODE = 64
MAX_TEXT = 200
#: characters kept of a (server-written) trust reason, and trust decisions listed
MAX_TRUST_TEXT = 500
RECENT_TRUST = 20


def config_view(config: ServerConfig, *, strategy: str) -> dict[str, Any]:
    """What an operator wants to see of the configuration (not the whole dataclass)."""
    return {
        "rounds": config.rounds,
        "clients_per_round": config.clients_per_round,
        "min_clients": config.min_clients,
        "min_reports": config.min_reports,
        "wait_for_clients_s": config.wait_for_clients_s,
        "round_timeout_s": config.round_timeout_s,
        "local_epochs": config.local_epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "codecs": list(config.codecs),
        "strategy": strategy,
        "over_selection": config.over_selection,
        "stratify": config.stratify,
        "model_channel": config.model_channel,
    }


def _device_reasons(eligibility: Mapping[str, Any]) -> list[dict[str, str]]:
    raw = eligibility.get("reasons")
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:MAX_REASONS]:
        if isinstance(item, Mapping) and isinstance(item.get("code"), str):
            text = item.get("text")
            out.append(
                {
                    "code": item["code"][:MAX_CODE],
                    "text": text[:MAX_TEXT] if isinstance(text, str) else "",
                    "source": "device",
                }
            )
    return out


def device_view(
    record: DeviceRecord, *, bundle_digest: str, now: float, quarantine: str | None = None
) -> dict[str, Any]:
    """One device; ``quarantine`` is tiered trust's reason when the device is quarantined."""
    current = record.bundle_digest == bundle_digest
    reasons: list[dict[str, str]] = []
    if quarantine is not None:
        reasons.append({"code": "quarantined", "text": quarantine[:MAX_TRUST_TEXT], "source": "server"})
    if not record.online:
        reasons.append({"code": "offline", "text": "the device is offline", "source": "server"})
    if not current:
        held = record.bundle_digest[:12] or "none"
        reasons.append(
            {
                "code": "other_bundle",
                "text": f"holds bundle {held}, the server trains {bundle_digest[:12]}",
                "source": "server",
            }
        )
    reasons.extend(_device_reasons(record.eligibility))
    phase = record.eligibility.get("phase")
    return {
        "device_id": record.device_id,
        "online": record.online,
        "device_class": record.device_class,
        "agent_version": record.agent_version,
        "num_examples": record.num_examples,
        "bundle_current": current,
        "eligible": record.online and current and not record.declines and quarantine is None,
        "quarantined": quarantine is not None,
        "phase": phase if isinstance(phase, str) else None,
        "reasons": reasons,
        "last_seen": record.last_seen,
        "last_seen_age_s": max(0.0, now - record.last_seen),
    }


def round_view(result: RoundResult) -> dict[str, Any]:
    view = asdict(result)
    view["outcome"] = "completed" if result.completed else "abandoned"
    return view


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return math.fsum(items) / len(items) if items else None


def rollout_view(state: RolloutState, *, now: float | None = None) -> dict[str, Any]:
    """The rollout's state; ``blockers`` (why it does not widen yet) needs ``now`` on the rollout's clock."""
    plan = state.plan
    ok = sum(1 for installed in state.installs.values() if installed)
    return {
        "rollout_id": plan.rollout_id,
        "version": plan.version,
        "baseline_version": plan.baseline_version,
        "status": state.status,
        "stage": state.stage,
        "stages": [stage.percent for stage in plan.stages],
        "percent": state.percent,
        "reason": state.reason,
        "installs": {"ok": ok, "failed": len(state.installs) - ok},
        "metric": plan.metric,
        "canary_mean": _mean(state.canary_metrics.values()),
        "canary_reports": len(state.canary_metrics),
        "baseline_mean": _mean(state.baseline_metrics.values()),
        "baseline_reports": len(state.baseline_metrics),
        "blockers": state.blockers(now) if now is not None and state.status == "active" else [],
    }


def trust_view(
    reputation: Reputation, events: Sequence[TrustDecision], *, recent: int = RECENT_TRUST
) -> dict[str, Any]:
    """The quarantined devices with their reasons, and the ``recent`` newest decisions (oldest first)."""
    quarantined = []
    for device_id in reputation.quarantined:
        status = reputation.status(device_id)
        quarantined.append(
            {
                "device_id": device_id,
                "reason": status.reason[:MAX_TRUST_TEXT],
                "score": status.score,
                "strikes": status.strikes,
            }
        )
    kept = list(events)[max(0, len(events) - recent) :]
    return {
        "quarantined": quarantined,
        "recent": [
            {
                "device_id": e.device_id,
                "round": e.round,
                "action": e.action,
                "reason": e.reason[:MAX_TRUST_TEXT],
                "score": e.score,
            }
            for e in kept
        ],
    }


def build_status(
    *,
    config: ServerConfig,
    strategy: str,
    model_version: int,
    bundle_digest: str,
    devices: Iterable[DeviceRecord],
    rounds: Sequence[RoundResult],
    now: float,
    rollout: RolloutState | None = None,
    rollout_now: float | None = None,
    last_rounds: int = 50,
    reputation: Reputation | None = None,
    trust_events: Sequence[TrustDecision] = (),
    privacy: Mapping[str, Any] | None = None,
    clusters: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The status document (see the module docstring); ``rounds`` oldest first, the last ``last_rounds`` kept.

    ``reputation`` (None: tiered trust is off) and ``trust_events`` are ``FederatedServer.reputation``
    and ``FederatedServer.trust_events``.
    """
    if last_rounds < 0:
        raise ValueError(f"last_rounds must be >= 0, got {last_rounds}")
    held = {d: reputation.status(d).reason for d in reputation.quarantined} if reputation is not None else {}
    views = [
        device_view(d, bundle_digest=bundle_digest, now=now, quarantine=held.get(d.device_id))
        for d in sorted(devices, key=lambda d: d.device_id)
    ]
    kept = rounds[max(0, len(rounds) - last_rounds) :]
    return {
        "schema": SCHEMA,
        "server": {**config_view(config, strategy=strategy), "bundle_digest": bundle_digest},
        "model_version": model_version,
        "device_counts": {
            "known": len(views),
            "online": sum(1 for v in views if v["online"]),
            "eligible": sum(1 for v in views if v["eligible"]),
        },
        "devices": views,
        "rounds_total": len(rounds),
        "rounds": [round_view(r) for r in kept],
        "rollout": rollout_view(rollout, now=rollout_now) if rollout is not None else None,
        "trust": trust_view(reputation, trust_events) if reputation is not None else None,
        "privacy": dict(privacy) if privacy is not None else None,
        "clusters": [dict(c) for c in clusters] if clusters is not None else None,
    }
