"""The ``rollout`` table of :class:`~broker_server.server_config.ServerConfig`, parsed once.

Keys (all optional; ``{}`` gives the defaults)::

    channel                      model channel the rollout runs on                  "current"
    stages                       list of percents, e.g. [5, 25, 100], or of tables  [10, 50, 100]
                                 {percent, min_devices, min_soak_s}; must end at 100
    min_devices                  devices running the new version before a stage     1
                                 widens (for stages given as numbers)
    min_soak_s                   seconds a stage runs before it widens (ditto)      0
    metric                       validation metric devices report on install        "accuracy"
                                 (STATUS ``install.metrics``: "loss", "accuracy")
    higher_is_better             direction of ``metric``                            true, false for "loss"
    max_metric_drop              act when the canary's mean metric is worse than    none (no metric rule)
                                 the baseline's by more than this (metric units)
    baseline_metric              fixed baseline value instead of the mean the       none
                                 canary devices report for the model they replaced
    min_eval_reports             canary (and baseline) reports before the metric    1
                                 rule judges and before a stage may widen
    max_install_failure_percent  act when more than this share of install attempts  none (no install rule)
                                 failed (a device rolling the version back counts)
    min_install_reports          install reports before the install rule judges     1
    on_problem                   "rollback" (canary devices return to the baseline) "rollback"
                                 or "halt" (stop widening, keep the canary)
    on_metric_drop               overrides ``on_problem`` for the metric rule       on_problem
    on_install_failures          overrides ``on_problem`` for the install rule      on_problem
    pins                         table device class -> version it always runs       {}

Every error is a :class:`ConfigError` naming the key (``rollout.<key>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from broker_server.rollout import Action, RolloutPlan, Stage
from edge_agent.errors import ConfigError
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = ["RolloutSettings", "parse_rollout"]

_KEYS = frozenset(
    {
        "channel",
        "stages",
        "min_devices",
        "min_soak_s",
        "metric",
        "higher_is_better",
        "max_metric_drop",
        "baseline_metric",
        "min_eval_reports",
        "max_install_failure_percent",
        "min_install_reports",
        "on_problem",
        "on_metric_drop",
        "on_install_failures",
        "pins",
    }
)


@dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """Everything of a :class:`RolloutPlan` but the rollout id and the two versions."""

    channel: str = "current"
    stages: tuple[Stage, ...] = (Stage(percent=10), Stage(percent=50), Stage(percent=100))
    pins: Mapping[str, int] = field(default_factory=dict)
    metric: str = "accuracy"
    higher_is_better: bool = True
    max_metric_drop: float | None = None
    baseline_metric: float | None = None
    min_eval_reports: int = 1
    on_metric_drop: Action = "rollback"
    max_install_failure_percent: float | None = None
    min_install_reports: int = 1
    on_install_failures: Action = "rollback"

    def plan(self, rollout_id: str, version: int, baseline_version: int) -> RolloutPlan:
        """The plan moving the fleet from ``baseline_version`` to ``version`` (ConfigError if invalid)."""
        return RolloutPlan(
            rollout_id=rollout_id,
            version=version,
            baseline_version=baseline_version,
            stages=self.stages,
            pins=dict(self.pins),
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            max_metric_drop=self.max_metric_drop,
            baseline_metric=self.baseline_metric,
            min_eval_reports=self.min_eval_reports,
            on_metric_drop=self.on_metric_drop,
            max_install_failure_percent=self.max_install_failure_percent,
            min_install_reports=self.min_install_reports,
            on_install_failures=self.on_install_failures,
        )


def parse_rollout(table: Mapping[str, Any] | None) -> RolloutSettings | None:
    """The settings of a ``rollout`` table (None: no table, every device gets the announced version)."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"rollout must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"rollout: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    channel = table.get("channel", "current")
    if not isinstance(channel, str) or not DEVICE_ID_PATTERN.match(channel):
        raise ConfigError(f"rollout.channel must be a channel name (1-64 of A-Z a-z 0-9 _ -), got {channel!r}")
    metric = table.get("metric", "accuracy")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"rollout.metric must be a metric name, got {metric!r}")
    on_problem = _action(table, "on_problem", "rollback")
    settings = RolloutSettings(
        channel=channel,
        stages=_stages(table),
        pins=_pins(table.get("pins", {})),
        metric=metric,
        higher_is_better=_bool(table, "higher_is_better", metric != "loss"),
        max_metric_drop=_number(table, "max_metric_drop"),
        baseline_metric=_number(table, "baseline_metric"),
        min_eval_reports=_int(table, "min_eval_reports", 1, minimum=1),
        on_metric_drop=_action(table, "on_metric_drop", on_problem),
        max_install_failure_percent=_number(table, "max_install_failure_percent"),
        min_install_reports=_int(table, "min_install_reports", 1, minimum=1),
        on_install_failures=_action(table, "on_install_failures", on_problem),
    )
    try:
        settings.plan("check", 2, 1)  # the plan's own rules (ranges, ordering)
    except ConfigError as exc:
        raise ConfigError(f"rollout: {exc.reason}") from exc
    return settings


def _stages(table: Mapping[str, Any]) -> tuple[Stage, ...]:
    raw = table.get("stages", [10, 50, 100])
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"rollout.stages must be a non-empty list, got {raw!r}")
    min_devices = _int(table, "min_devices", 1, minimum=0)
    min_soak_s = _number(table, "min_soak_s") or 0.0  # None: no soak
    stages = []
    for i, item in enumerate(raw):
        key = f"rollout.stages[{i}]"
        entry: Mapping[str, Any] = item if isinstance(item, Mapping) else {"percent": item}
        extra = sorted(set(entry) - {"percent", "min_devices", "min_soak_s"})
        if extra or "percent" not in entry:
            raise ConfigError(f"{key} must be a percent or a table of percent, min_devices, min_soak_s; got {item!r}")
        percent = _number(entry, "percent", key=f"{key}.percent")
        soak = _number(entry, "min_soak_s", key=f"{key}.min_soak_s")
        try:
            stages.append(
                Stage(
                    percent=cast(float, percent),
                    min_devices=_int(entry, "min_devices", min_devices, minimum=0, key=f"{key}.min_devices"),
                    min_soak_s=soak if soak is not None else min_soak_s,
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc.reason}") from exc
    return tuple(stages)


def _pins(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"rollout.pins must be a table of device class -> version, got {raw!r}")
    pins = {}
    for device_class, version in raw.items():
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"rollout.pins.{device_class} must be a version >= 0, got {version!r}")
        pins[str(device_class)] = version
    return pins


def _number(table: Mapping[str, Any], name: str, *, key: str | None = None) -> float | None:
    value = table.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key or 'rollout.' + name} must be a finite number, got {value!r}")
    return float(value)


def _int(table: Mapping[str, Any], name: str, default: int, *, minimum: int, key: str | None = None) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key or 'rollout.' + name} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(table: Mapping[str, Any], name: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"rollout.{name} must be true or false, got {value!r}")
    return value


def _action(table: Mapping[str, Any], name: str, default: Action) -> Action:
    value = table.get(name, default)
    if value not in ("halt", "rollback"):
        raise ConfigError(f"rollout.{name} must be 'halt' or 'rollback', got {value!r}")
    return cast(Action, value)
