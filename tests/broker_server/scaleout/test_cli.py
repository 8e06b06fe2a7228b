"""``fedflock broker --role``: the [scaleout] table from file and flags, refusals before anything opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_server.scaleout import parse_scaleout
from edge_agent.errors import ConfigError
from fedflock.broker_cli import run_broker
from fedflock.broker_scaleout import scaleout_table
from fedflock.cli import build_parser


def test_the_table_comes_from_the_file_with_flags_on_top(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[server]\nbundle = "b"\n[scaleout]\ngroup = "g"\nlease_s = 4\n')
    args = build_parser().parse_args(
        ["broker", "--config", str(config), "--role", "worker", "--scaleout-option", "worker_id=w7"]
    )
    got = parse_scaleout(scaleout_table(args))
    assert (got.group, got.lease_s, got.worker_id) == ("g", 4.0, "w7")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--store", "sqlite:///tmp/never.db"], "server.store: scale-out mode"),
        (["--store", "postgresql://db/x", "--mode", "async"], "mode: scale-out mode"),
        (["--store", "postgresql://db/x", "--scaleout-option", "lease=3"], "unknown key scaleout.lease"),
    ],
)
def test_refusals_name_the_key_before_anything_is_opened(flags: list[str], message: str, tmp_path: Path) -> None:
    args = build_parser().parse_args(["broker", "--bundle", str(tmp_path / "missing"), "--role", "worker", *flags])
    with pytest.raises(ConfigError, match=message):
        run_broker(args)
