"""`fedflock broker` flags: parsed once into a ServerConfig, mistakes are config errors."""

from __future__ import annotations

import pytest

from broker_server.server_config import ServerConfig
from edge_agent.errors import ConfigError
from fedflock.broker_cli import server_config, strategy_table
from fedflock.cli import build_parser, main

BASE = ["broker", "--bundle", "b"]


def parsed(*flags: str) -> ServerConfig:
    return server_config(build_parser().parse_args([*BASE, *flags]))


def test_strategy_and_selection_flags_reach_the_config() -> None:
    config = parsed(
        "--strategy",
        "fedadam",
        "--strategy-option",
        "server_lr=0.01",
        "--strategy-option",
        "beta1=0",
        "--over-selection",
        "1.3",
        "--stratify",
        "--max-rounds-per-window",
        "2",
        "--budget-window",
        "3600",
    )
    assert config.strategy == {"name": "fedadam", "server_lr": 0.01, "beta1": 0}
    assert config.make_strategy().name == "fedadam"
    assert (config.over_selection, config.stratify) == (1.3, True)
    assert (config.max_rounds_per_window, config.budget_window_s) == (2, 3600.0)
    assert parsed().strategy == {} and parsed().make_strategy().name == "fedavg"


def test_option_values_are_json_when_they_can_be() -> None:
    table = strategy_table("fedprox", ["mu=0.5", "local_epochs=3", "client_lr=null", "note=hello"])
    assert table == {"name": "fedprox", "mu": 0.5, "local_epochs": 3, "client_lr": None, "note": "hello"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy-option", "mu=1"], "needs --strategy"),
        (["--strategy", "fedprox", "--strategy-option", "mu"], "KEY=VALUE"),
        (["--strategy", "fedprox", "--strategy-option", "mu=1", "--strategy-option", "mu=2"], "twice"),
        (["--strategy", "fedsgd"], "unknown name 'fedsgd'"),
        (["--strategy", "fedprox", "--strategy-option", "beta1=0.9"], "unknown key 'beta1'"),
        (["--strategy", "fedadam", "--strategy-option", "tau=-1"], "tau must be > 0"),
        (["--over-selection", "0.5"], "over_selection"),
        (["--max-rounds-per-window", "2"], "budget_window_s"),
    ],
)
def test_bad_flags_are_config_errors(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parsed(*flags)


def test_the_command_reports_a_bad_strategy_before_opening_anything(tmp_path, capsys) -> None:
    code = main([*BASE, "--strategy", "fedsgd", "--store", f"sqlite:///{tmp_path / 'server.db'}"])
    assert code == 2 and "config_error" in capsys.readouterr().err
    assert not (tmp_path / "server.db").exists()
