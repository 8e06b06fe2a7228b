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


def test_print_config_shows_the_scaleout_table_and_reads_back(tmp_path: Path) -> None:
    import tomllib

    from fedflock.broker_flags import resolve_settings
    from fedflock.broker_scaleout import scaleout_to_print
    from fedflock.broker_toml import render_settings

    config = tmp_path / "broker.toml"
    config.write_text('[server]\nbundle = "b"\nstore = "postgresql://db/x"\n[scaleout]\nlease_s = 4\n')
    argv = ["broker", "--config", str(config), "--role", "coordinator", "--scaleout-option", "group=g2"]
    args = build_parser().parse_args([*argv, "--print-config"])
    text = render_settings(resolve_settings(args), scaleout_to_print(args))
    printed = tomllib.loads(text)["scaleout"]
    assert printed["lease_s"] == 4.0 and printed["group"] == "g2" and "worker_id" not in printed
    assert printed["heartbeat_s"] == 0.2 and printed["max_result_bytes"] == 64 << 20  # defaults filled in
    again = tmp_path / "printed.toml"
    again.write_text(text)
    reread = build_parser().parse_args(["broker", "--config", str(again), "--role", "worker"])
    assert parse_scaleout(scaleout_table(reread)) == parse_scaleout(scaleout_table(args))


def test_print_config_leaves_scaleout_out_of_a_single_server(tmp_path: Path) -> None:
    from fedflock.broker_scaleout import scaleout_to_print

    assert scaleout_to_print(build_parser().parse_args(["broker", "--bundle", "b", "--print-config"])) is None


def test_the_broker_command_prints_the_scaleout_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedflock.cli import main

    config = tmp_path / "broker.toml"
    config.write_text('[server]\nbundle = "b"\nstore = "postgresql://db/x"\n[scaleout]\nlease_s = 4\n')
    assert main(["broker", "--config", str(config), "--role", "worker", "--print-config"]) == 0
    assert "[scaleout]" in capsys.readouterr().out
