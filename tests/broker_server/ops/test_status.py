"""The status document: device eligibility and reasons, the last rounds, the rollout, JSON-ready."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from broker_server.ops.status import MAX_REASONS, MAX_TEXT, build_status, device_view
from broker_server.registry import DeviceRecord
from broker_server.rollout import EvalReport, InstallReport, RolloutPlan, RolloutState
from broker_server.server_config import RoundResult, ServerConfig

DIGEST = "a" * 64
NOW = 1000.0


def record(device_id: str, **fields: Any) -> DeviceRecord:
    values: dict[str, Any] = {
        "online": True,
        "bundle_digest": DIGEST,
        "num_examples": 100,
        "agent_version": "0.1.0",
        "last_seen": NOW - 5,
    }
    values.update(fields)
    return DeviceRecord(device_id=device_id, **values)


def round_result(number: int, *, completed: bool = True, accuracy: float | None = None) -> RoundResult:
    return RoundResult(
        round=number,
        model_version=number if completed else number - 1,
        selected=4,
        reported=4 if completed else 0,
        failed=0,
        num_examples=400 if completed else 0,
        duration_s=10.0 + number,
        completed=completed,
        reason="" if completed else "0 updates < min_reports 1",
        train_metrics={"train_loss": 0.5} if completed else {},
        test_loss=1.0 / number if completed else None,
        test_accuracy=accuracy,
    )


DECLINED = {
    "phase": "train",
    "eligible": False,
    "reasons": [{"code": "battery_low", "text": "battery 12% < 30%"}, {"code": "not_charging", "text": "unplugged"}],
}


def devices() -> list[DeviceRecord]:
    return [
        record("dev-c", device_class="phone", eligibility=DECLINED),
        record("dev-a", device_class="gateway"),
        record("dev-b", online=False, last_seen=NOW - 600),
        record("dev-<b>x</b>", bundle_digest="b" * 64, device_class="<i>odd</i>"),
    ]


def rounds() -> list[RoundResult]:
    return [
        round_result(1, accuracy=0.42),
        round_result(2, completed=False),
        round_result(3, accuracy=0.61),
        round_result(4, accuracy=0.73),
    ]


def rollout() -> RolloutState:
    plan = RolloutPlan.staged(
        [10, 50, 100], min_devices=2, min_soak_s=60, rollout_id="r-7", version=4, baseline_version=3
    )
    state, _ = RolloutState.start(plan, now=0.0).step(
        [
            InstallReport(device_id="dev-a", version=4, ok=True),
            InstallReport(device_id="dev-c", version=4, ok=False),
            EvalReport(device_id="dev-a", version=4, metrics={"accuracy": 0.7}),
            EvalReport(device_id="dev-b", version=3, metrics={"accuracy": 0.6}),
        ],
        now=10.0,
    )
    return state


def sample_status(**overrides: Any) -> dict[str, Any]:
    """A realistic status document (also what the web and dashboard tests serve)."""
    fields: dict[str, Any] = {
        "config": ServerConfig(rounds=10, clients_per_round=4),
        "strategy": "fedavg",
        "model_version": 3,
        "bundle_digest": DIGEST,
        "devices": devices(),
        "rounds": rounds(),
        "now": NOW,
        "rollout": rollout(),
        "rollout_now": 30.0,
    }
    fields.update(overrides)
    return build_status(**fields)


def test_counts_and_devices_sorted_by_id() -> None:
    status = sample_status()
    assert status["schema"] == 1
    assert status["device_counts"] == {"known": 4, "online": 3, "eligible": 1}
    assert [d["device_id"] for d in status["devices"]] == ["dev-<b>x</b>", "dev-a", "dev-b", "dev-c"]
    assert status["server"]["clients_per_round"] == 4 and status["server"]["strategy"] == "fedavg"
    assert status["server"]["bundle_digest"] == DIGEST
    assert status["model_version"] == 3


def test_eligibility_reasons_from_the_server_and_the_device() -> None:
    views = {d["device_id"]: d for d in sample_status()["devices"]}
    assert views["dev-a"]["eligible"] and views["dev-a"]["reasons"] == []
    declined = views["dev-c"]
    assert not declined["eligible"] and declined["phase"] == "train"
    assert [(r["code"], r["source"]) for r in declined["reasons"]] == [
        ("battery_low", "device"),
        ("not_charging", "device"),
    ]
    assert [r["code"] for r in views["dev-b"]["reasons"]] == ["offline"]
    assert views["dev-b"]["last_seen_age_s"] == 600
    other = views["dev-<b>x</b>"]
    assert not other["eligible"] and other["bundle_current"] is False
    assert [r["code"] for r in other["reasons"]] == ["other_bundle"]


def test_untrusted_device_reasons_are_clipped_and_malformed_ones_dropped() -> None:
    eligibility = {
        "phase": "train",
        "eligible": False,
        "reasons": [{"code": "x", "text": "y" * 5000}, "not a dict", {"text": "no code"}, {"code": 5}]
        + [{"code": f"c{i}"} for i in range(100)],
    }
    view = device_view(record("d", eligibility=eligibility), bundle_digest=DIGEST, now=NOW)
    assert len(view["reasons"]) <= MAX_REASONS
    assert view["reasons"][0] == {"code": "x", "text": "y" * MAX_TEXT, "source": "device"}
    assert all(isinstance(r["code"], str) for r in view["reasons"])
    odd = device_view(record("d", eligibility={"reasons": "nope", "phase": 3}), bundle_digest=DIGEST, now=NOW)
    assert odd["reasons"] == [] and odd["phase"] is None


def test_rounds_keep_the_last_n_oldest_first_with_outcomes() -> None:
    status = sample_status(last_rounds=3)
    assert status["rounds_total"] == 4
    assert [r["round"] for r in status["rounds"]] == [2, 3, 4]
    assert [r["outcome"] for r in status["rounds"]] == ["abandoned", "completed", "completed"]
    assert status["rounds"][2]["test_accuracy"] == 0.73 and status["rounds"][2]["train_metrics"] == {"train_loss": 0.5}
    assert sample_status(last_rounds=0)["rounds"] == []
    assert len(sample_status(last_rounds=50)["rounds"]) == 4
    with pytest.raises(ValueError):
        sample_status(last_rounds=-1)


def test_rollout_state_and_blockers() -> None:
    view = sample_status()["rollout"]
    assert view["rollout_id"] == "r-7" and (view["baseline_version"], view["version"]) == (3, 4)
    assert view["status"] == "active" and view["stage"] == 0 and view["stages"] == [10, 50, 100]
    assert view["percent"] == 10 and view["installs"] == {"ok": 1, "failed": 1}
    assert view["canary_mean"] == 0.7 and view["baseline_mean"] == 0.6
    assert view["canary_reports"] == view["baseline_reports"] == 1
    assert any("soaked" in b for b in view["blockers"]) and any("need 2" in b for b in view["blockers"])
    assert sample_status(rollout=None)["rollout"] is None
    assert sample_status(rollout_now=None)["rollout"]["blockers"] == []


def test_the_document_is_strict_json() -> None:
    status = sample_status(rounds=[round_result(1, accuracy=math.nan)])
    # build_status keeps values as they are; the HTTP layer turns NaN into null (test_web)
    assert math.isnan(status["rounds"][0]["test_accuracy"])
    json.dumps(sample_status(), allow_nan=False)
