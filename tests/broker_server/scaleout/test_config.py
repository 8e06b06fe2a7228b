"""The [scaleout] table and what scale-out mode refuses, each naming its key."""

from __future__ import annotations

import pytest

from broker_server.scaleout import ScaleoutSettings, check_scaleout, parse_scaleout
from broker_server.server_config import ServerConfig
from edge_agent.errors import ConfigError

PG = "postgresql://db/fedflock"


def test_defaults_and_values() -> None:
    assert parse_scaleout(None) == ScaleoutSettings()
    got = parse_scaleout({"group": "g1", "lease_s": 3, "max_result_bytes": 1 << 20, "worker_id": "w-1"})
    assert (got.group, got.lease_s, got.max_result_bytes, got.name) == ("g1", 3.0, 1 << 20, "w-1")
    assert ScaleoutSettings().name  # hostname-pid


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"groups": "x"}, "unknown key scaleout.groups"),
        ({"group": "a/b"}, "scaleout.group"),
        ({"lease_s": 0}, "scaleout.lease_s"),
        ({"lease_s": 0.3, "heartbeat_s": 0.2}, "scaleout.lease_s"),
        ({"fold_threads": 1.5}, "scaleout.fold_threads"),
        ({"poll_s": "fast"}, "scaleout.poll_s"),
        ({"max_result_bytes": 10}, "scaleout.max_result_bytes"),
    ],
)
def test_bad_keys_are_named(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_scaleout(table)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"mode": "async"}, "mode"),
        ({"late_updates": "async"}, "late_updates"),
        ({"robust": {"rule": "median"}}, "robust"),
        ({"trust": {}}, "trust"),
        ({"clusters": {}}, "clusters"),
        ({"rollout": {}}, "rollout"),
    ],
)
def test_what_needs_every_update_in_one_place_is_refused(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: scale-out mode"):
        check_scaleout(ServerConfig(**changes), PG)  # type: ignore[arg-type]


def test_fedavg_family_strategies_run_and_the_store_must_be_postgres() -> None:
    check_scaleout(ServerConfig(strategy={"name": "fedadam", "server_lr": 0.01}), PG)
    for url in (None, "sqlite:///tmp/x.db"):
        with pytest.raises(ConfigError, match=r"server\.store"):
            check_scaleout(ServerConfig(), url)
