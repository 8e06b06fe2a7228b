"""The agent's config file: the documented example parses, defaults hold, and every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.codecs import DEFAULT_PREFERENCES
from edge_agent.config import AGENT_CONFIG_EXAMPLE, MqttSettings, load_agent_config
from edge_agent.datasources import CsvSource, NpzSource
from edge_agent.device.network import NetworkConfig
from edge_agent.device.policy import Policy
from edge_agent.errors import ConfigError

HEAD = 'device_id = "pi-01"\nbundle = "bundle"\n'
DATA = '[data]\nkind = "npz"\npath = "d.npz"\n'
DAY = 86_400.0


def config_text(*, top: str = "", tables: str = "", head: str = HEAD, data: str = DATA) -> str:
    """A config: top-level keys first (TOML puts every key after a table header into that table)."""
    return f"{head}{top}\n{data}\n{tables}"


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert info.value.code == "config_error"
    return info.value.reason


def test_the_documented_example_parses_into_every_setting(tmp_path) -> None:
    path = write(tmp_path, AGENT_CONFIG_EXAMPLE)
    config = load_agent_config(path)
    assert config.path == path.resolve()
    assert (config.device_id, config.device_class) == ("pi-kitchen-01", "pi")
    assert config.state_dir == Path("/var/lib/fedflock")
    assert config.bundle == Path("/opt/fedflock/bundle")
    assert config.mqtt == MqttSettings(
        url="mqtts://broker.example.org:8883",
        username="pi-kitchen-01",
        password_file=Path("/etc/fedflock/password"),
        ca_file=Path("/etc/fedflock/ca.pem"),
        cert_file=Path("/etc/fedflock/device.pem"),
        key_file=Path("/etc/fedflock/device.key"),
        topic_prefix="fedflock/v1",
        protocol="auto",
    )
    source = config.data.source
    assert isinstance(source, CsvSource)
    assert source.path == Path("/var/lib/fedflock/data/readings.csv") and source.label_columns == ("label",)
    assert config.policy == Policy(min_battery_percent=60)
    assert config.network == NetworkConfig(metered={"wwan*": True, "usb0": True}, use_nmcli=True)
    # [codecs] replaces one network's preference; the others keep the defaults
    assert config.codec_preferences["cellular"] == ("topk-int8:0.01", "int4")
    assert config.codec_preferences["wifi"] == DEFAULT_PREFERENCES["wifi"]
    assert config.monitor_interval_s == 30.0
    assert config.result_ttl_s == 72 * 3600.0
    assert config.retention_s == 7 * DAY
    assert config.chunk_bytes == 256 * 1024
    assert config.error_feedback is True and config.seed == 0


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = config_text(
        top='state_dir = "../var/state"\n',
        data='[data]\nkind = "npz"\npath = "data/d.npz"\n',
        tables='[mqtt]\nurl = "mqtts://b.example:8883"\nusername = "pi-01"\npassword_file = "secret"\n'
        'ca_file = "~/ca.pem"\ncert_file = "/abs/dev.pem"\nkey_file = "tls/dev.key"\n',
    )
    etc = tmp_path / "etc"
    config = load_agent_config(write(etc, text))
    assert config.bundle == etc / "bundle"
    assert config.state_dir == tmp_path / "var" / "state"  # ".." resolved away
    assert isinstance(config.data.source, NpzSource) and config.data.source.path == etc / "data" / "d.npz"
    assert config.mqtt.password_file == etc / "secret"
    assert config.mqtt.ca_file == tmp_path / "home" / "ca.pem"  # "~" is the user's home, not relative
    assert config.mqtt.cert_file == Path("/abs/dev.pem")  # absolute stays absolute
    assert config.mqtt.key_file == etc / "tls" / "dev.key"


def test_loading_through_a_relative_path_still_gives_absolute_paths(tmp_path, monkeypatch) -> None:
    write(tmp_path / "conf", config_text())
    monkeypatch.chdir(tmp_path)
    config = load_agent_config("conf/agent.toml")
    assert config.path == tmp_path / "conf" / "agent.toml"
    assert config.bundle == tmp_path / "conf" / "bundle"


def test_defaults_of_a_minimal_config(tmp_path) -> None:
    config = load_agent_config(write(tmp_path, config_text()))
    assert config.device_class == "default"
    assert config.state_dir == tmp_path / "pi-01.state"  # next to the config file
    assert config.mqtt == MqttSettings()
    assert config.mqtt.url == "mqtt://127.0.0.1:1883" and config.mqtt.topic_prefix == "fedflock/v1"
    assert config.policy == Policy()
    assert config.network == NetworkConfig()
    assert dict(config.codec_preferences) == DEFAULT_PREFERENCES
    assert config.codec_preferences is not DEFAULT_PREFERENCES  # a copy: parsing never mutates the default
    assert (config.monitor_interval_s, config.result_ttl_s, config.retention_s) == (30.0, 72 * 3600.0, 7 * DAY)
    assert (config.chunk_bytes, config.error_feedback, config.seed) == (256 * 1024, True, 0)


def test_agent_settings_convert_units(tmp_path) -> None:
    tables = (
        "[agent]\nmonitor_interval_s = 2.5\nresult_ttl_hours = 1.5\nretention_days = 2\nchunk_kib = 64\n"
        "error_feedback = false\nseed = 7\n"
    )
    config = load_agent_config(write(tmp_path, config_text(tables=tables)))
    assert config.monitor_interval_s == 2.5
    assert config.result_ttl_s == 1.5 * 3600
    assert config.retention_s == 2 * DAY
    assert config.chunk_bytes == 64 * 1024
    assert config.error_feedback is False and config.seed == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(config_text(top='colour = "red"\n'), "unknown key colour (known: agent, bundle", id="top-level"),
        pytest.param(config_text(tables='[mqtt]\nhost = "b"\n'), "unknown key mqtt.host (known: ", id="mqtt-key"),
        pytest.param(
            config_text(tables="[agent]\nmonitor_interval = 5\n"), "unknown key agent.monitor_interval", id="agent-key"
        ),
        pytest.param(
            config_text(tables="[network]\nmetred = { eth0 = true }\n"), "unknown key network.metred", id="network-key"
        ),
        pytest.param(
            config_text(tables='[mqtt]\nusername = "u"\npassword = "hunter2"\n'),
            "mqtt.password: put the password in a file and give mqtt.password_file",
            id="password",
        ),
        pytest.param(
            config_text(tables='[mqtt]\nurl = "mqtts://b:8883"\ncert_file = "c.pem"\n'),
            "mqtt.cert_file and mqtt.key_file go together",
            id="cert-without-key",
        ),
        pytest.param(
            config_text(tables='[mqtt]\nurl = "mqtts://b:8883"\nkey_file = "k.pem"\n'),
            "mqtt.cert_file and mqtt.key_file go together",
            id="key-without-cert",
        ),
        pytest.param(
            config_text(tables='[mqtt]\npassword_file = "secret"\n'),
            "mqtt.password_file needs mqtt.username",
            id="password-file-without-username",
        ),
        pytest.param(config_text(tables='[mqtt]\nurl = "http://b:1883"\n'), "mqtt.url: invalid mqtt url", id="url"),
        pytest.param(
            config_text(tables='[mqtt]\nca_file = "ca.pem"\n'), "mqtt.url: 'mqtt://127.0.0.1:1883' is plain", id="tls"
        ),
        pytest.param(
            config_text(tables='[mqtt]\nprotocol = "4"\n'), "mqtt.protocol: mqtt protocol must be", id="proto"
        ),
        pytest.param(config_text(tables="[mqtt]\nport = 1883\n"), "unknown key mqtt.port", id="mqtt-port"),
        pytest.param(config_text(top='mqtt = "mqtt://b"\n'), "mqtt: expected a table, got str", id="mqtt-not-table"),
        pytest.param(config_text(tables='[codecs]\nwifi = ["int9"]\n'), "codecs.wifi: ", id="bad-codec"),
        pytest.param(
            config_text(tables='[codecs]\nwifi = "int8"\n'), "codecs.wifi: expected a non-empty list", id="codec-str"
        ),
        pytest.param(config_text(tables="[codecs]\nwifi = []\n"), "codecs.wifi: expected a non-empty list", id="empty"),
        pytest.param(
            config_text(tables='[codecs]\nlte = ["int8"]\n'), "codecs.lte: unknown network kind", id="codec-network"
        ),
        pytest.param(
            config_text(tables='[network]\nmetered = { "wwan*" = "yes" }\n'),
            "network.metered.wwan*: expected true or false, got 'yes'",
            id="metered-not-bool",
        ),
        pytest.param(
            config_text(tables='[network]\nuse_nmcli = "no"\n'), "network.use_nmcli: expected true or false", id="nmcli"
        ),
        pytest.param(config_text(head='bundle = "b"\n'), "device_id: missing", id="no-device-id"),
        pytest.param(config_text(head='device_id = "pi-01"\n'), "bundle: missing", id="no-bundle"),
        pytest.param(config_text(data=""), "[data]: missing", id="no-data"),
        pytest.param(
            config_text(head='device_id = "pi kitchen"\nbundle = "b"\n'),
            "device_id: invalid device id 'pi kitchen'",
            id="device-id-space",
        ),
        pytest.param(
            config_text(head=f'device_id = "{"x" * 65}"\nbundle = "b"\n'), "device_id: invalid device id", id="long-id"
        ),
        pytest.param(
            config_text(head='device_id = 7\nbundle = "b"\n'), "device_id: expected a string, got 7", id="id-int"
        ),
        pytest.param(config_text(top='device_class = ""\n'), "device_class: expected a non-empty string", id="class"),
        pytest.param(config_text(top="state_dir = 1\n"), "state_dir: expected a string, got 1", id="state-dir"),
        pytest.param(config_text(data='[data]\nkind = "parquet"\n'), "[data] kind must be one of", id="data-kind"),
        pytest.param(
            config_text(tables="[policy]\nmin_battery_percent = 150\n"), "policy.min_battery_percent", id="policy"
        ),
        pytest.param(
            config_text(tables='[policy.unknown]\nbattery = "maybe"\n'), "policy.unknown.battery", id="policy-unknown"
        ),
        pytest.param(config_text(tables="[agent]\nretention_days = 0\n"), "agent.retention_days: must be", id="ret"),
        pytest.param(config_text(tables="[agent]\nresult_ttl_hours = -1\n"), "agent.result_ttl_hours", id="ttl"),
        pytest.param(config_text(tables="[agent]\nmonitor_interval_s = inf\n"), "agent.monitor_interval_s", id="inf"),
        pytest.param(config_text(tables="[agent]\nchunk_kib = 0.5\n"), "agent.chunk_kib: must be >= 1", id="chunk"),
        pytest.param(config_text(tables='[agent]\nchunk_kib = "256"\n'), "agent.chunk_kib: expected a number", id="c"),
        pytest.param(config_text(tables="[agent]\nseed = -1\n"), "agent.seed: expected an integer >= 0", id="seed"),
        pytest.param(config_text(tables="[agent]\nseed = 1.5\n"), "agent.seed: expected an integer >= 0", id="seed-f"),
        pytest.param(
            config_text(tables="[agent]\nerror_feedback = 1\n"), "agent.error_feedback: expected true or false", id="ef"
        ),
    ],
)
def test_every_error_names_its_key(tmp_path, text: str, expected: str) -> None:
    reason = error_of(write(tmp_path, text))
    assert expected in reason, reason


def test_bad_toml_is_reported_with_the_file_and_the_position(tmp_path) -> None:
    path = write(tmp_path, 'device_id = "pi-01"\nbundle = \n')
    reason = error_of(path)
    assert reason.startswith(f"agent config {path} is not valid TOML:"), reason
    assert "line 2" in reason, reason


def test_a_file_that_is_not_utf8_is_bad_toml(tmp_path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'device_id = "\xff\xfe"\n')
    assert "is not valid TOML" in error_of(path)


def test_a_missing_or_unreadable_file_says_so(tmp_path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"cannot read agent config {missing}: No such file or directory"
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    assert error_of(directory) == f"cannot read agent config {directory}: Is a directory"


@pytest.mark.parametrize(
    ("device_class", "budget", "retention_days", "expected_s"),
    [
        pytest.param("default", 'default = { rounds = 1, per = "month" }', 7, 30 * DAY, id="month-beats-7-days"),
        pytest.param("default", "default = { rounds = 1, per = 1209600 }", 7, 14 * DAY, id="seconds"),
        pytest.param("default", 'default = { rounds = 3, per = "day" }', 7, 7 * DAY, id="shorter-budget"),
        pytest.param("default", 'default = { rounds = 3, per = "week" }', 10, 10 * DAY, id="longer-retention"),
        pytest.param(
            "camera",
            'default = { rounds = 3, per = "day" }\ncamera = { rounds = 1, per = "month" }',
            7,
            30 * DAY,
            id="class",
        ),
        pytest.param(
            "gateway", 'default = { rounds = 1, per = "month" }\ngateway = "unlimited"', 7, 7 * DAY, id="unlim"
        ),
    ],
)
def test_retention_covers_the_budget_window(
    tmp_path, device_class: str, budget: str, retention_days: int, expected_s: float
) -> None:
    """The participation history is what the budget counts, so it must be kept for the whole window."""
    text = config_text(
        top=f'device_class = "{device_class}"\n',
        tables=f"[agent]\nretention_days = {retention_days}\n\n[policy.budget]\n{budget}\n",
    )
    config = load_agent_config(write(tmp_path, text))
    assert config.retention_s == expected_s
