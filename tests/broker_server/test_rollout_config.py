"""The ``rollout`` table: defaults, both stage forms, every error naming its key; and the pure
reading of STATUS install reports."""

from __future__ import annotations

from typing import Any

import pytest

from broker_server.rollout import EvalReport, InstallReport, Stage
from broker_server.rollout_config import parse_rollout
from broker_server.rollout_reports import install_observations
from broker_server.server_config import ServerConfig
from edge_agent.errors import ConfigError

NEW, BASE = "a" * 64, "b" * 64


def test_a_full_table_parses_into_a_plan() -> None:
    settings = parse_rollout(
        {
            "channel": "stable",
            "stages": [5, {"percent": 50, "min_devices": 3, "min_soak_s": 60}, 100],
            "min_devices": 2,
            "min_soak_s": 10,
            "metric": "loss",
            "max_metric_drop": 0.2,
            "max_install_failure_percent": 5,
            "min_install_reports": 4,
            "on_problem": "halt",
            "on_install_failures": "rollback",
            "pins": {"kiosk": 3},
        }
    )
    assert settings is not None and settings.channel == "stable"
    assert settings.stages == (
        Stage(percent=5, min_devices=2, min_soak_s=10),
        Stage(percent=50, min_devices=3, min_soak_s=60),
        Stage(percent=100, min_devices=2, min_soak_s=10),
    )
    assert settings.higher_is_better is False  # loss
    assert (settings.on_metric_drop, settings.on_install_failures) == ("halt", "rollback")
    plan = settings.plan("r", 4, 3)
    assert plan.pins == {"kiosk": 3} and plan.max_install_failure_percent == 5 and plan.min_install_reports == 4


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"stage": [100]}, "unknown key(s) stage"),
        ({"stages": []}, "rollout.stages"),
        ({"stages": [50]}, "stages must end at 100"),
        ({"stages": [50, 20, 100]}, "percentages must increase"),
        ({"stages": [{"percent": 100, "soak": 1}]}, "rollout.stages[0]"),
        ({"stages": [{"percent": 100, "min_devices": -1}]}, "rollout.stages[0].min_devices"),
        ({"stages": ["half", 100]}, "rollout.stages[0].percent"),
        ({"max_metric_drop": "big"}, "rollout.max_metric_drop"),
        ({"max_install_failure_percent": 100}, "max_install_failure_percent"),
        ({"on_problem": "panic"}, "rollout.on_problem"),
        ({"pins": {"kiosk": "v1"}}, "rollout.pins.kiosk"),
        ({"channel": "a/b"}, "rollout.channel"),
        ({"higher_is_better": "yes"}, "rollout.higher_is_better"),
        ({"min_eval_reports": 0}, "rollout.min_eval_reports"),
    ],
)
def test_bad_tables_are_config_errors_naming_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_rollout(table)
    assert key in str(raised.value)
    with pytest.raises(ConfigError):
        ServerConfig(rollout=table)  # validated with the whole server config


def test_install_reports_become_observations_by_bundle_digest() -> None:
    from broker_server.rollout import RolloutPlan

    plan = RolloutPlan.staged([100], rollout_id="r", version=2, baseline_version=1)
    ok = {
        "ok": True,
        "version": 2,
        "digest": NEW,
        "previous_digest": BASE,
        "metrics": {"loss": 0.5, "accuracy": 0.8, "bad": "x"},
        "previous_metrics": {"loss": 0.6},
    }
    assert install_observations("d", ok, plan, new_digest=NEW, baseline_digest=BASE) == [
        InstallReport(device_id="d", version=2, ok=True),
        EvalReport(device_id="d", version=2, metrics={"loss": 0.5, "accuracy": 0.8}),
        EvalReport(device_id="d", version=1, metrics={"loss": 0.6}),
    ]
    failed = {"ok": False, "version": 2, "digest": None, "stage": "validate"}
    rolled_back = {"ok": True, "version": 0, "digest": BASE, "previous_digest": NEW}
    for report in (failed, rolled_back):
        assert install_observations("d", report, plan, new_digest=NEW, baseline_digest=BASE) == [
            InstallReport(device_id="d", version=2, ok=False)
        ]
    other = {"ok": False, "version": 7, "digest": None}
    assert install_observations("d", other, plan, new_digest=NEW, baseline_digest=BASE) == []
    assert install_observations("d", {"ok": "yes"}, plan, new_digest=NEW, baseline_digest=BASE) == []
