"""`fedflock broker --config broker.toml`: the file's tables, relative paths, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_server.server_config import ServerConfig
from edge_agent.errors import ConfigError
from fedflock.broker_config import BrokerSettings, read_document
from fedflock.broker_flags import resolve_settings
from fedflock.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "broker" / "broker.toml"

FULL = """
[server]
bundle = "bundle"
out = "runs/server"
test_data = "data/test.npz"
store = "state/server.db"
rounds = 7
clients_per_round = 4
min_clients = 3
min_reports = 2
wait_for_clients_s = 12.5
round_timeout_s = 30
local_epochs = 3
batch_size = 8
lr = 0.1
seed = 5
freeze = ["fc.weight"]
model_channel = "stable"
model_version = 4
mode = "async"
late_updates = "async"

[mqtt]
url = "mqtts://broker.example.org"
client_id = "server-a"
topic_prefix = "acme/v1"
username = "server"
password_file = "secrets/password"
ca_file = "pki/ca.pem"
cert_file = "pki/server.pem"
key_file = "pki/server.key"
protocol = "3.1.1"

[selection]
over_selection = 1.5
stratify = true
max_rounds_per_window = 2
budget_window_s = 3600

[codecs]
offer = ["fp16", "fp32"]
chunk_bytes = 65536

[ops]
port = 9100
host = "0.0.0.0"

[hyperparameters]
class_weights = [1, 5]
temperature = 2

[strategy]
name = "fedadam"
server_lr = 0.01

[robust]
rule = "clip"
clip = 2.5

[trust]
quarantine_after = 5

[asynchronous]
buffer_size = 3
staleness = "hinge"
"""


def load(tmp_path: Path, text: str, *flags: str) -> BrokerSettings:
    path = tmp_path / "conf" / "broker.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return resolve_settings(build_parser().parse_args(["broker", "--config", str(path), *flags]))


def test_every_table_maps_onto_the_settings(tmp_path: Path) -> None:
    settings = load(tmp_path, FULL)
    conf = (tmp_path / "conf").resolve()
    config = settings.server
    assert (settings.bundle, settings.out, settings.test_data) == (
        conf / "bundle",
        conf / "runs/server",
        conf / "data/test.npz",
    )
    assert settings.store == f"sqlite://{conf / 'state/server.db'}"
    assert (config.rounds, config.clients_per_round, config.min_clients, config.min_reports) == (7, 4, 3, 2)
    assert (config.wait_for_clients_s, config.round_timeout_s, config.local_epochs, config.batch_size) == (
        12.5,
        30,
        3,
        8,
    )
    assert (config.lr, config.seed, config.frozen, config.model_channel, config.model_version) == (
        0.1,
        5,
        ("fc.weight",),
        "stable",
        4,
    )
    assert (config.mode, config.late_updates) == ("async", "async")
    assert config.topics.prefix == "acme/v1" and settings.client_id == "server-a"
    mqtt = settings.mqtt
    assert (mqtt.url, mqtt.username, mqtt.protocol) == ("mqtts://broker.example.org", "server", "3.1.1")
    assert (mqtt.password_file, mqtt.ca_file) == (conf / "secrets/password", conf / "pki/ca.pem")
    assert (mqtt.cert_file, mqtt.key_file) == (conf / "pki/server.pem", conf / "pki/server.key")
    assert (config.over_selection, config.stratify, config.max_rounds_per_window, config.budget_window_s) == (
        1.5,
        True,
        2,
        3600.0,
    )
    assert (config.codecs, config.chunk_bytes) == (("fp16", "fp32"), 65536)
    assert (settings.ops.port, settings.ops.host) == (9100, "0.0.0.0")
    assert config.hyperparameters == {"class_weights": (1.0, 5.0), "temperature": 2.0}
    assert config.make_strategy().name == "fedadam" and config.strategy == {"name": "fedadam", "server_lr": 0.01}
    assert config.robust == {"rule": "clip", "clip": 2.5} and config.trust == {"quarantine_after": 5}
    assert config.asynchronous == {"buffer_size": 3, "staleness": "hinge"}  # passed through as is
    assert config.fedbuff_settings().buffer_size == 3
    assert config.rollout is None


def test_the_rollout_table_is_passed_through_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[server]\nbundle = "b"\n[rollout]\nstages = [5, 50, 100]\npins = { gpu = 3 }\n')
    assert read_document(path)["rollout"] == {"stages": [5, 50, 100], "pins": {"gpu": 3}}


def test_a_minimal_file_gets_the_flag_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, '[server]\nbundle = "/b"\n')
    flags_only = resolve_settings(build_parser().parse_args(["broker", "--bundle", "/b"]))
    assert settings == flags_only
    config = settings.server
    assert config.wait_for_clients_s == 300.0 and config.rounds == ServerConfig.rounds
    assert config.trust is None and config.robust == {} and config.rollout is None and config.strategy == {}
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883" and settings.client_id is None
    assert settings.ops.port is None and settings.out == Path("fedflock-server").resolve()


def test_an_empty_trust_table_turns_trust_on_with_its_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, '[server]\nbundle = "/b"\n[trust]\n')
    assert settings.server.trust == {} and settings.server.trust_config() is not None


def test_absolute_paths_and_postgres_urls_are_kept(tmp_path: Path) -> None:
    pg = "postgresql://fedflock@db.internal/fedflock"
    settings = load(tmp_path, f'[server]\nbundle = "/opt/b"\nstore = "{pg}"\n')
    assert settings.bundle == Path("/opt/b") and settings.store == pg
    absolute = load(tmp_path, '[server]\nbundle = "b"\nstore = "sqlite:///var/lib/f/server.db"\n')
    assert absolute.store == "sqlite:///var/lib/f/server.db"


def test_the_shipped_example_parses(tmp_path: Path) -> None:
    settings = resolve_settings(build_parser().parse_args(["broker", "--config", str(EXAMPLE)]))
    assert settings.bundle == Path("/opt/fedflock/bundle")
    assert settings.mqtt.url.startswith("mqtts://") and settings.mqtt.password_file is not None
    assert settings.server.robust_settings() is not None and settings.server.trust_config() is not None
    assert settings.ops.port == 9100
    # every fixed table of the reference appears in the example
    assert {"server", "mqtt", "selection", "codecs", "ops", "strategy", "robust", "trust"} <= set(
        read_document(EXAMPLE)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nbundle = "b"\nround = 3\n', r"unknown key server\.round \(known: batch_size, bundle, "),
        (
            '[server]\nbundle = "b"\n[mqtt]\nhost = "x"\n',
            r"unknown key mqtt\.host \(known: ca_file, cert_file, client_id",
        ),
        ('[server]\nbundle = "b"\n[selection]\nk = 3\n', r"unknown key selection\.k"),
        (
            '[server]\nbundle = "b"\n[servers]\n',
            r"unknown table or key 'servers' \(known tables: asynchronous, blobs, clusters, codecs",
        ),
        ('rounds = 3\n[server]\nbundle = "b"\n', r"rounds: put it in the \[server\] table"),
        ("server = 3\n", r"server: expected a table"),
        ("[server]\nrounds = 3\n", r"server\.bundle \(--bundle\): missing"),
        ('[server]\nbundle = "b"\nrounds = 0\n', r"server\.rounds \(--rounds\): expected an integer >= 1, got 0"),
        ('[server]\nbundle = "b"\nrounds = "5"\n', r"server\.rounds \(--rounds\): expected an integer >= 1, got '5'"),
        ('[server]\nbundle = "b"\nlr = -1\n', r"server\.lr \(--lr\): expected a finite number >= 0, got -1"),
        ('[server]\nbundle = "b"\nround_timeout_s = 0\n', r"server\.round_timeout_s \(--round-timeout\): must be > 0"),
        (
            '[server]\nbundle = "b"\nmode = "fast"\n',
            r"server\.mode \(--mode\): expected one of sync, async, got 'fast'",
        ),
        (
            '[server]\nbundle = "b"\nlate_updates = 1\n',
            r"server\.late_updates \(--late-updates\): expected one of drop",
        ),
        ("[server]\nbundle = 3\n", r"server\.bundle \(--bundle\): expected a path, got 3"),
        ('[server]\nbundle = "b"\nfreeze = "fc"\n', r"server\.freeze \(--freeze\): expected a list of names"),
        ('[server]\nbundle = "b"\nmodel_channel = 1\n', r"server\.model_channel: expected a channel name or false"),
        (
            '[server]\nbundle = "b"\n[selection]\nstratify = "yes"\n',
            r"selection\.stratify \(--stratify\): expected true",
        ),
        ('[server]\nbundle = "b"\n[codecs]\noffer = []\n', r"codecs\.offer \(--codecs\): must name at least one"),
        ('[server]\nbundle = "b"\n[codecs]\noffer = ["zip"]\n', r"zip"),
        ('[server]\nbundle = "b"\n[ops]\nport = 70000\n', r"ops\.port \(--ops-port\): must be a port number 1-65535"),
        ('[server]\nbundle = "b"\n[mqtt]\npassword = "x"\n', r"mqtt\.password: put the password in a file"),
        ('[server]\nbundle = "b"\n[mqtt]\nurl = "http://x"\n', r"mqtt\.url: invalid mqtt url 'http://x'"),
        (
            '[server]\nbundle = "b"\n[mqtt]\nca_file = "ca.pem"\n',
            r"mqtt\.url: 'mqtt://127\.0\.0\.1:1883' is plain mqtt://",
        ),
        ('[server]\nbundle = "b"\n[mqtt]\npassword_file = "p"\n', r"mqtt\.password_file needs mqtt\.username"),
        ('[server]\nbundle = "b"\n[mqtt]\nclient_id = ""\n', r"mqtt\.client_id: expected a non-empty string"),
        ('[server]\nbundle = "b"\n[hyperparameters]\nw = "x"\n', r"hyperparameters\.w: expected a number or a list"),
        (
            '[server]\nbundle = "b"\n[strategy]\nname = "fedprox"\nbeta1 = 0.9\n',
            r"strategy 'fedprox': unknown key 'beta1'",
        ),
        ('[server]\nbundle = "b"\n[robust]\nrule = "krum"\n', r"robust: rule 'krum' needs 'f'"),
        ('[server]\nbundle = "b"\n[trust]\nsigma = 3\n', r"trust: unknown key 'sigma' \(known: alpha,"),
        ('[server]\nbundle = "b"\n[asynchronous]\nbuffer = 3\n', r"asynchronous\.buffer: unknown key"),
        ('[server]\nbundle = "b"\n[selection]\nmax_rounds_per_window = 2\n', r"budget_window_s"),
        ('[server]\nbundle = "b"\nclients_per_round = 2\nmin_reports = 3\n', r"min_reports must be between 1"),
    ],
)
def test_mistakes_are_config_errors_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_an_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read broker config .*missing\.toml: No such file"):
        resolve_settings(build_parser().parse_args(["broker", "--config", str(tmp_path / "missing.toml")]))
    with pytest.raises(ConfigError, match=r"broker config .*broker\.toml is not valid TOML: .*line 1"):
        load(tmp_path, "[server\n")


def test_the_ota_statement_lifetime(tmp_path: Path) -> None:
    from broker_server.pki.release_signer import DEFAULT_STATEMENT_LIFETIME_S
    from fedflock.broker_toml import render_settings

    key = tmp_path / "conf" / "release.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("not read while parsing")
    base = f'[server]\nbundle = "b"\n\n[ota]\nsigning_key = "{key}"\n'
    default = load(tmp_path, base).statement_lifetime_s
    assert default == DEFAULT_STATEMENT_LIFETIME_S == BrokerSettings.statement_lifetime_s
    settings = load(tmp_path, base + 'statement_lifetime = "7d"\n')
    assert settings.statement_lifetime_s == 7 * 86400.0
    assert 'statement_lifetime = "604800s"' in render_settings(settings)
    assert load(tmp_path, base + 'statement_lifetime = "none"\n').statement_lifetime_s is None
    with pytest.raises(ConfigError, match=r"ota\.statement_lifetime"):
        load(tmp_path, base + 'statement_lifetime = "1w"\n')


def test_the_blobs_table_parses_prints_and_reads_back(tmp_path: Path) -> None:
    from fedflock.broker_toml import render_settings

    text = (
        '[server]\nbundle = "b"\n\n[blobs]\nbackend = "local"\nthreshold = 1048576\nroot = "state/blobs"\n'
        'public_url = "https://fl.example.com:8790"\nlisten_port = 8791\nurl_lifetime_s = 600\n'
    )
    settings = load(tmp_path, text)
    blobs = settings.server.blobs_config()
    assert blobs is not None and blobs.backend == "local" and blobs.threshold == 1 << 20
    assert blobs.root == (tmp_path / "conf" / "state" / "blobs").resolve()  # relative to the file, like the other paths
    assert (blobs.public_url, blobs.listen_port, blobs.url_lifetime_s) == ("https://fl.example.com:8790", 8791, 600)
    printed = tmp_path / "printed" / "broker.toml"
    printed.parent.mkdir()
    printed.write_text(render_settings(settings))
    again = resolve_settings(build_parser().parse_args(["broker", "--config", str(printed)]))
    assert again.server.blobs_config() == blobs
    s3_table = '[blobs]\nbackend = "s3"\nendpoint = "http://minio:9000"\nbucket = "fl-blobs"\n'
    s3 = load(tmp_path, '[server]\nbundle = "b"\n' + s3_table).server.blobs_config()
    assert s3 is not None and (s3.backend, s3.bucket, s3.endpoint) == ("s3", "fl-blobs", "http://minio:9000")
    assert load(tmp_path, '[server]\nbundle = "b"\n').server.blobs_config() is None
    with pytest.raises(ConfigError, match=r"blobs\.bucket is required"):
        load(tmp_path, '[server]\nbundle = "b"\n[blobs]\nbackend = "s3"\nendpoint = "http://minio:9000"\n')
    with pytest.raises(ConfigError, match=r"blobs\.threshold must be an integer"):
        load(tmp_path, '[server]\nbundle = "b"\n[blobs]\nthreshold = "big"\n')
    with pytest.raises(ConfigError, match=r"blobs\.tresholds: unknown key"):
        load(tmp_path, '[server]\nbundle = "b"\n[blobs]\ntresholds = 5\n')
