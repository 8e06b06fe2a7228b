"""Staged model rollout (canary → fleet) with automatic halt and rollback: pure logic, no I/O.

A :class:`RolloutPlan` moves devices from ``baseline_version`` to ``version`` in stages of
growing percentages (e.g. 5, 25, 50, 100). Each device's cohort is fixed by hashing
``(rollout_id, device_id)`` (:func:`cohort_bucket`), so a device in the 5 % canary stays in it,
every later stage is a superset of the earlier ones, and a new rollout id reshuffles the fleet.

:class:`RolloutState` is an immutable state machine: :meth:`RolloutState.step` folds
observations (install reports and evaluation metrics per device and version) in and returns the
new state and the decisions taken:

* **rollback** (or **halt**, per rule) when the canary's mean metric is more than
  ``max_metric_drop`` below the baseline's, or more than ``max_install_failure_percent`` of the
  devices that tried to install the new version failed (each rule needs a minimum of reports
  before it judges);
* **advance** to the next stage once the current one soaked ``min_soak_s``, at least
  ``min_devices`` devices run the new version and the metric has enough canary reports;
* **complete** when the last stage has soaked.

:meth:`RolloutState.target_version` says what a device should run now; per-class pins override
everything. ``to_json``/``from_json`` round-trip the whole state (plan included) for persistence.
The caller turns decisions and target versions into MODEL announcements and FETCH gating
(docs/protocol.md §8.5).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

from edge_agent.errors import ConfigError

#: cohort buckets per 100 %: percentages resolve to 1/10,000 of a percent
_BUCKETS = 1_000_000

Action = Literal["halt", "rollback"]
Status = Literal["active", "halted", "rolled_back", "complete"]


def cohort_bucket(rollout_id: str, device_id: str) -> float:
    """The device's stable position in ``[0, 100)`` for this rollout (uniform over devices)."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % _BUCKETS) * 100 / _BUCKETS


@dataclass(frozen=True, kw_only=True)
class Stage:
    #: share of the fleet running the new version in this stage, (0, 100]
    percent: float
    #: devices that must have installed the new version before the next stage
    min_devices: int = 1
    #: seconds this stage must run before the next one
    min_soak_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.percent <= 100:
            raise ConfigError(f"stage percent must be in (0, 100], got {self.percent}")
        if self.min_devices < 0 or not (math.isfinite(self.min_soak_s) and self.min_soak_s >= 0):
            raise ConfigError("min_devices and min_soak_s must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RolloutPlan:
    rollout_id: str
    version: int
    baseline_version: int
    stages: tuple[Stage, ...]
    #: device class -> version it always runs, whatever the rollout's stage or status
    pins: Mapping[str, int] = field(default_factory=dict)
    #: evaluation metric the rules watch, and its direction
    metric: str = "accuracy"
    higher_is_better: bool = True
    #: act when the canary mean is worse than the baseline mean by more than this (metric units;
    #: None: no metric rule)
    max_metric_drop: float | None = None
    #: fixed baseline value; None: the mean of the baseline version's reports
    baseline_metric: float | None = None
    #: canary (and, without ``baseline_metric``, baseline) devices reporting the metric before the
    #: metric rule judges and before a stage may advance
    min_eval_reports: int = 1
    on_metric_drop: Action = "rollback"
    #: act when more than this percentage of install attempts failed (None: no install rule)
    max_install_failure_percent: float | None = None
    min_install_reports: int = 1
    on_install_failures: Action = "rollback"

    def __post_init__(self) -> None:
        if not self.rollout_id:
            raise ConfigError("rollout_id must not be empty")
        if self.version == self.baseline_version or min(self.version, self.baseline_version) < 0:
            raise ConfigError("version and baseline_version must differ and be >= 0")
        if not self.stages or self.stages[-1].percent != 100:
            raise ConfigError("stages must end at 100 percent")
        if any(a.percent >= b.percent for a, b in pairwise(self.stages)):
            raise ConfigError("stage percentages must increase")
        if self.max_metric_drop is not None and not (math.isfinite(self.max_metric_drop) and self.max_metric_drop >= 0):
            raise ConfigError("max_metric_drop must be finite and >= 0")
        failure = self.max_install_failure_percent
        if failure is not None and not 0 <= failure < 100:
            raise ConfigError("max_install_failure_percent must be in [0, 100)")
        if self.min_eval_reports < 1 or self.min_install_reports < 1:
            raise ConfigError("min_eval_reports and min_install_reports must be >= 1")

    @classmethod
    def staged(
        cls, percents: Iterable[float], *, min_devices: int = 1, min_soak_s: float = 0.0, **fields: Any
    ) -> RolloutPlan:
        """A plan whose stages share ``min_devices`` and ``min_soak_s``."""
        stages = tuple(Stage(percent=p, min_devices=min_devices, min_soak_s=min_soak_s) for p in percents)
        return cls(stages=stages, **fields)

    def cohort(self, device_id: str) -> int:
        """Index of the first stage that includes ``device_id``."""
        bucket = cohort_bucket(self.rollout_id, device_id)
        return next(i for i, stage in enumerate(self.stages) if bucket < stage.percent)

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "version": self.version,
            "baseline_version": self.baseline_version,
            "stages": [
                {"percent": s.percent, "min_devices": s.min_devices, "min_soak_s": s.min_soak_s} for s in self.stages
            ],
            "pins": dict(self.pins),
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "max_metric_drop": self.max_metric_drop,
            "baseline_metric": self.baseline_metric,
            "min_eval_reports": self.min_eval_reports,
            "on_metric_drop": self.on_metric_drop,
            "max_install_failure_percent": self.max_install_failure_percent,
            "min_install_reports": self.min_install_reports,
            "on_install_failures": self.on_install_failures,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutPlan:
        fields = dict(data)
        fields["stages"] = tuple(Stage(**stage) for stage in data["stages"])
        fields["pins"] = {str(k): int(v) for k, v in data["pins"].items()}
        return cls(**fields)


# -- observations and decisions ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstallReport:
    """A device's install (or rollback) outcome, e.g. from its STATUS ``install`` object."""

    device_id: str
    version: int
    ok: bool


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Evaluation metrics a device measured on ``version`` (e.g. UPDATE ``local_eval_accuracy``)."""

    device_id: str
    version: int
    metrics: Mapping[str, float]


Observation = InstallReport | EvalReport


@dataclass(frozen=True, kw_only=True)
class Decision:
    kind: Literal["advance", "halt", "rollback", "complete"]
    #: the stage index after the decision
    stage: int
    reason: str


# -- the state machine ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RolloutState:
    plan: RolloutPlan
    status: Status = "active"
    stage: int = 0
    stage_started_at: float
    #: device id -> its latest install outcome for ``plan.version``
    installs: Mapping[str, bool] = field(default_factory=dict)
    #: device id -> its latest ``plan.metric`` value on ``plan.version`` / ``plan.baseline_version``
    canary_metrics: Mapping[str, float] = field(default_factory=dict)
    baseline_metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""

    @classmethod
    def start(cls, plan: RolloutPlan, now: float) -> RolloutState:
        return cls(plan=plan, stage_started_at=now)

    @property
    def percent(self) -> float:
        """Share of the fleet that should run the new version now."""
        if self.status == "rolled_back":
            return 0.0
        if self.status == "complete":
            return 100.0
        return self.plan.stages[self.stage].percent

    def target_version(self, device_id: str, device_class: str | None = None) -> int:
        """The version ``device_id`` should run now."""
        plan = self.plan
        if device_class is not None and device_class in plan.pins:
            return plan.pins[device_class]
        if self.status == "rolled_back":
            return plan.baseline_version
        if self.status == "complete" or plan.cohort(device_id) <= self.stage:
            return plan.version
        return plan.baseline_version

    def step(self, observations: Iterable[Observation], now: float) -> tuple[RolloutState, list[Decision]]:
        """Fold ``observations`` in, then apply the health rules and try to advance one stage."""
        state = self._observe(observations)
        if state.status not in ("active", "halted"):
            return state, []
        problems = state._health_problems()
        # a halted rollout still rolls back when a rollback rule fires; it never widens
        for action in ("rollback", "halt"):
            reasons = [reason for act, reason in problems if act == action]
            if reasons and not (action == "halt" and state.status == "halted"):
                status: Status = "rolled_back" if action == "rollback" else "halted"
                reason = "; ".join(reasons)
                return replace(state, status=status, reason=reason), [
                    Decision(kind=action, stage=state.stage, reason=reason)
                ]
        if state.status == "halted":
            return state, []
        if state.blockers(now):
            return state, []
        if state.stage == len(state.plan.stages) - 1:
            reason = f"v{state.plan.version} runs on the whole fleet"
            return replace(state, status="complete", reason=reason), [
                Decision(kind="complete", stage=state.stage, reason=reason)
            ]
        stage = state.stage + 1
        reason = f"stage {state.stage} healthy: widening to {state.plan.stages[stage].percent}%"
        return replace(state, stage=stage, stage_started_at=now), [Decision(kind="advance", stage=stage, reason=reason)]

    def blockers(self, now: float) -> list[str]:
        """Why the current stage may not advance yet (empty: it may)."""
        plan = self.plan
        stage = plan.stages[self.stage]
        out = []
        soaked = now - self.stage_started_at
        if soaked < stage.min_soak_s:
            out.append(f"soaked {soaked:.0f}s of {stage.min_soak_s:.0f}s")
        installed = sum(self.installs.values())
        if installed < stage.min_devices:
            out.append(f"{installed} devices run v{plan.version}, need {stage.min_devices}")
        if plan.max_metric_drop is not None and self._baseline() is None:
            out.append(f"no baseline {plan.metric} yet")
        if plan.max_metric_drop is not None and len(self.canary_metrics) < plan.min_eval_reports:
            out.append(f"{len(self.canary_metrics)} canary {plan.metric} reports, need {plan.min_eval_reports}")
        return out

    def resume(self, now: float) -> RolloutState:
        """Operator: continue a halted rollout (the current stage soaks again from ``now``)."""
        if self.status != "halted":
            raise ValueError(f"only a halted rollout resumes, this one is {self.status}")
        return replace(self, status="active", stage_started_at=now, reason="")

    def rollback(self, reason: str) -> RolloutState:
        """Operator: send every (unpinned) device back to the baseline version."""
        if self.status == "rolled_back":
            return self
        return replace(self, status="rolled_back", reason=reason)

    # -- internals -------------------------------------------------------------------------------

    def _observe(self, observations: Iterable[Observation]) -> RolloutState:
        plan = self.plan
        installs = dict(self.installs)
        canary = dict(self.canary_metrics)
        baseline = dict(self.baseline_metrics)
        for obs in observations:
            if isinstance(obs, InstallReport):
                if obs.version == plan.version:
                    installs[obs.device_id] = obs.ok
            elif plan.metric in obs.metrics and math.isfinite(value := float(obs.metrics[plan.metric])):
                if obs.version == plan.version:
                    canary[obs.device_id] = value
                elif obs.version == plan.baseline_version:
                    baseline[obs.device_id] = value
        return replace(self, installs=installs, canary_metrics=canary, baseline_metrics=baseline)

    def _baseline(self) -> float | None:
        if self.plan.baseline_metric is not None:
            return self.plan.baseline_metric
        if len(self.baseline_metrics) < self.plan.min_eval_reports:
            return None
        return _mean(self.baseline_metrics.values())

    def _health_problems(self) -> list[tuple[Action, str]]:
        plan = self.plan
        problems: list[tuple[Action, str]] = []
        if plan.max_install_failure_percent is not None and len(self.installs) >= plan.min_install_reports:
            failed = sum(1 for ok in self.installs.values() if not ok)
            rate = 100.0 * failed / len(self.installs)
            if rate > plan.max_install_failure_percent:
                reason = (
                    f"{failed}/{len(self.installs)} installs of v{plan.version} failed "
                    f"({rate:.1f}% > {plan.max_install_failure_percent}%)"
                )
                problems.append((plan.on_install_failures, reason))
        baseline = self._baseline()
        if (
            plan.max_metric_drop is not None
            and baseline is not None
            and len(self.canary_metrics) >= plan.min_eval_reports
        ):
            canary = _mean(self.canary_metrics.values())
            drop = baseline - canary if plan.higher_is_better else canary - baseline
            if drop > plan.max_metric_drop:
                reason = (
                    f"{plan.metric} of v{plan.version} is {canary:.4g} vs baseline {baseline:.4g} "
                    f"(worse by {drop:.4g} > {plan.max_metric_drop})"
                )
                problems.append((plan.on_metric_drop, reason))
        return problems

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_json(),
            "status": self.status,
            "stage": self.stage,
            "stage_started_at": self.stage_started_at,
            "installs": dict(self.installs),
            "canary_metrics": dict(self.canary_metrics),
            "baseline_metrics": dict(self.baseline_metrics),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        status = data["status"]
        if status not in ("active", "halted", "rolled_back", "complete"):
            raise ValueError(f"unknown rollout status {status!r}")
        plan = RolloutPlan.from_json(data["plan"])
        stage = int(data["stage"])
        if not 0 <= stage < len(plan.stages):
            raise ValueError(f"stage {stage} is outside the plan's {len(plan.stages)} stages")
        return cls(
            plan=plan,
            status=status,
            stage=stage,
            stage_started_at=float(data["stage_started_at"]),
            installs={str(k): bool(v) for k, v in data["installs"].items()},
            canary_metrics={str(k): float(v) for k, v in data["canary_metrics"].items()},
            baseline_metrics={str(k): float(v) for k, v in data["baseline_metrics"].items()},
            reason=str(data["reason"]),
        )


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return math.fsum(items) / len(items)
