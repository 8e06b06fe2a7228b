"""`fedflock broker --config FILE [flags]`: flags given override the file; --print-config shows the result."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from edge_agent.errors import ConfigError
from fedflock.broker_config import BrokerSettings
from fedflock.broker_flags import resolve_settings
from fedflock.broker_toml import render_toml, settings_document
from fedflock.cli import build_parser, main

BASE = """
[server]
bundle = "bundle"
rounds = 5
clients_per_round = 6
min_clients = 6
freeze = ["a", "b"]

[mqtt]
url = "mqtt://10.0.0.1:1883"
topic_prefix = "file/v1"

[codecs]
offer = ["fp16"]

[hyperparameters]
class_weights = [1, 2]
temperature = 3

[strategy]
name = "fedadam"
server_lr = 0.01
beta1 = 0.8

[robust]
rule = "trimmed_mean"
beta = 0.2

[trust]
quarantine_after = 4

[asynchronous]
buffer_size = 4
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "etc" / "broker.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def resolve(*argv: str) -> BrokerSettings:
    return resolve_settings(build_parser().parse_args(["broker", *argv]))


def test_the_file_applies_where_no_flag_is_given(tmp_path: Path) -> None:
    settings = resolve("--config", str(write(tmp_path)))
    assert settings.server.rounds == 5 and settings.server.topics.prefix == "file/v1"
    assert settings.bundle == (tmp_path / "etc" / "bundle").resolve()


def test_a_flag_given_overrides_its_key_even_when_it_repeats_the_default(tmp_path: Path) -> None:
    config = write(tmp_path)
    settings = resolve(
        "--config", str(config), "--rounds", "20", "--topic-prefix", "flag/v1", "--mqtt-url", "mqtt://h:1"
    )
    assert settings.server.rounds == 20  # 20 is also the built-in default: still the flag's
    assert settings.server.clients_per_round == 6  # untouched keys stay the file's
    assert (settings.mqtt.url, settings.server.topics.prefix) == ("mqtt://h:1", "flag/v1")


def test_relative_flag_paths_resolve_against_the_cwd_and_file_paths_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, BASE.replace('bundle = "bundle"', 'bundle = "bundle"\nout = "runs"\nstore = "s.db"'))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    settings = resolve("--config", str(config), "--out", "mine", "--test-data", "t.npz")
    assert settings.out == work / "mine" and settings.test_data == work / "t.npz"
    assert settings.bundle == tmp_path / "etc" / "bundle" and settings.store == f"sqlite://{tmp_path / 'etc' / 's.db'}"
    assert resolve("--config", str(config), "--store", "sqlite://here.db").store == f"sqlite://{work / 'here.db'}"


def test_list_flags_replace_the_files_lists(tmp_path: Path) -> None:
    settings = resolve("--config", str(write(tmp_path)), "--freeze", "c", "--codecs", "int8,fp32")
    assert settings.server.frozen == ("c",) and settings.server.codecs == ("int8", "fp32")


def test_option_flags_set_single_keys_of_the_files_tables(tmp_path: Path) -> None:
    settings = resolve(
        "--config",
        str(write(tmp_path)),
        "--strategy-option",
        "server_lr=0.02",
        "--robust-option",
        "max_buffer_mb=64",
        "--trust-option",
        "alpha=0.5",
        "--hyperparameter",
        "temperature=7",
        "--async-option",
        "max_staleness=3",
    )
    config = settings.server
    assert config.strategy == {"name": "fedadam", "server_lr": 0.02, "beta1": 0.8}
    assert config.robust == {"rule": "trimmed_mean", "beta": 0.2, "max_buffer_mb": 64}
    assert config.trust == {"quarantine_after": 4, "alpha": 0.5}
    assert config.hyperparameters == {"class_weights": (1.0, 2.0), "temperature": 7.0}
    assert config.asynchronous == {"buffer_size": 4, "max_staleness": 3}


def test_naming_a_strategy_or_rule_replaces_the_files_table(tmp_path: Path) -> None:
    settings = resolve("--config", str(write(tmp_path)), "--strategy", "fedprox", "--robust", "clip:2", "--trust")
    assert settings.server.strategy == {"name": "fedprox"}
    assert settings.server.robust == {"rule": "clip", "clip": 2}
    assert settings.server.trust == {"quarantine_after": 4}  # --trust keeps the file's trust settings


def test_mode_late_updates_and_async_options(tmp_path: Path) -> None:
    settings = resolve(
        "--bundle",
        "b",
        "--mode",
        "async",
        "--async-option",
        "buffer_size=3",
        "--async-option",
        "staleness=hinge",
        "--async-option",
        "hinge_a=2.5",
    )
    config = settings.server
    assert config.mode == "async" and config.asynchronous == {"buffer_size": 3, "staleness": "hinge", "hinge_a": 2.5}
    assert config.fedbuff_settings().hinge_a == 2.5
    assert resolve("--bundle", "b", "--late-updates", "async").server.late_updates == "async"
    with pytest.raises(ConfigError, match=r"--async-option buffer_size is given twice"):
        resolve("--bundle", "b", "--async-option", "buffer_size=3", "--async-option", "buffer_size=4")
    with pytest.raises(ConfigError, match=r"asynchronous\.buffer_size: must be an integer, got 'x'"):
        resolve("--bundle", "b", "--async-option", "buffer_size=x")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy-option", "mu=1"], r"--strategy-option needs --strategy NAME \(or \[strategy\] name"),
        (["--robust-option", "m=2"], r"--robust-option needs --robust RULE \(or \[robust\] rule"),
        (["--trust-option", "alpha=0.5"], r"--trust-option needs --trust \(or a \[trust\] table"),
        (["--rounds", "0"], r"server\.rounds \(--rounds\): expected an integer >= 1, got 0"),
        (["--ops-port", "0"], r"ops\.port \(--ops-port\): expected an integer >= 1, got 0"),
        ([], r"server\.bundle \(--bundle\): missing"),
    ],
)
def test_flag_mistakes_name_the_flag(flags: list[str], message: str) -> None:
    argv = ["--bundle", "b", *flags] if flags else []
    with pytest.raises(ConfigError, match=message):
        resolve(*argv)


def test_a_plain_url_flag_over_a_files_tls_settings_is_refused(tmp_path: Path) -> None:
    text = BASE.replace('url = "mqtt://10.0.0.1:1883"', 'url = "mqtts://b.example.org"\nca_file = "ca.pem"')
    config = write(tmp_path, text)
    assert resolve("--config", str(config)).mqtt.ca_file == tmp_path / "etc" / "ca.pem"
    with pytest.raises(ConfigError, match=r"mqtt\.url: 'mqtt://b\.example\.org' is plain mqtt:// but TLS files"):
        resolve("--config", str(config), "--mqtt-url", "mqtt://b.example.org")


def test_print_config_prints_toml_that_reads_back_to_the_same_settings(tmp_path: Path, capsys) -> None:
    config = write(tmp_path)
    argv = ["broker", "--config", str(config), "--rounds", "9", "--ops-port", "9200", "--out", str(tmp_path / "o")]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["server"]["rounds"] == 9
    assert not (tmp_path / "o").exists()  # printing opens and creates nothing
    echo = tmp_path / "printed.toml"
    echo.write_text(printed)
    assert resolve("--config", str(echo)) == resolve(*argv[1:])


def test_the_toml_writer_round_trips_awkward_values() -> None:
    doc = {
        "server": {"bundle": 'a "quoted"\\path\twith\ncontrol\x7f', "lr": 1e-7, "freeze": [], "skip": None},
        "hyperparameters": {"odd key": [1.5, float("inf")], "n": -3},
        "rollout": {"stages": [{"percent": 5}, {"percent": 100}], "pins": {}},
    }
    back = tomllib.loads(render_toml(doc))
    assert back["server"] == {"bundle": doc["server"]["bundle"], "lr": 1e-7, "freeze": []}
    assert back["hyperparameters"] == {"odd key": [1.5, float("inf")], "n": -3}
    assert back["rollout"] == {"stages": [{"percent": 5}, {"percent": 100}], "pins": {}}


def test_no_password_is_ever_printed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pw").write_text("hunter2\n")
    text = BASE.replace('url = "mqtt://10.0.0.1:1883"', 'url = "mqtt://h"\nusername = "u"\npassword_file = "pw"')
    doc = settings_document(resolve("--config", str(write(tmp_path, text))))
    assert doc["mqtt"]["password_file"] == str(tmp_path / "etc" / "pw")
    assert "hunter2" not in render_toml(doc)


def test_the_command_reports_a_bad_file_key_and_exits_2(tmp_path: Path, capsys) -> None:
    config = write(tmp_path, BASE + "\n[ops]\nprot = 1\n")
    assert main(["broker", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "error [config_error]: unknown key ops.prot (known: host, port)" in err
