"""deploy/compose: the files fit together, checked with the real parsers and a real Mosquitto.

No Docker engine runs here, so nothing starts a container. Instead: compose.yaml is read as YAML
and every path, port, host name and variable that broker.toml and mosquitto.conf name is checked
against it (the server's own config parser reads broker.toml); mosquitto.conf must be exactly
what ``fedflock pki mosquitto-config`` generates; and the compose layout is run without
containers: a real Mosquitto starts with compose's mosquitto.conf after each container path is
replaced by the host file compose.yaml mounts there, and the server's [mqtt] settings from
broker.toml (paths mapped the same way) reach a device through it over mutual TLS and the ACL.
``docker compose config`` itself runs in tests/deploy/test_schemas.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

from broker_server.mosquitto_process import free_port
from broker_server.pki.mosquitto_run import ConfiguredMosquitto
from broker_server.pki.store import PkiStore
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig
from fedflock.broker_config import BrokerSettings, build_settings, read_document
from fedflock.cli import main
from fedflock.wiring import configured_server_transport

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose"
GENERATE = [
    "pki", "mosquitto-config", "--dir", "/mosquitto/pki", "--auth", "certificate",
    "--acl-file", "/mosquitto/config/fedflock.acl", "--persistence-location", "/mosquitto/data",
    "--run-as-user", "mosquitto",
]  # fmt: skip
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return document


def expand(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` with ``env`` (else the default); ``${VAR:?msg}`` needs ``env``."""
    return _VAR.sub(lambda m: (env or {}).get(m.group(1)) or m.group(2) or "", text)


def mounts(service: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Container path -> host source (relative to deploy/compose) of a service's volumes."""
    table = {}
    for volume in compose()["services"][service]["volumes"]:
        source, target, *_ = expand(volume, env).split(":")
        table[target] = source
    return table


def host_path(container: str, table: dict[str, str], base: Path) -> Path:
    """The host file behind ``container``: the longest mount target that contains it."""
    path = PurePosixPath(container)
    for target in sorted(table, key=len, reverse=True):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            source = table[target]
            assert source.startswith("./"), f"{container} is on the named volume {source}, not a host file"
            return base / source / path.relative_to(target)
    raise AssertionError(f"{container} is not mounted into the container")


def settings() -> BrokerSettings:
    return build_settings(read_document(COMPOSE / "broker.toml"))


def conf_paths(text: str) -> dict[str, str]:
    keys = ("acl_file", "persistence_location", "cafile", "certfile", "keyfile", "crlfile")
    return {
        line.split()[0]: line.split()[1] for line in text.splitlines() if line.split()[:1] and line.split()[0] in keys
    }


def test_mosquitto_conf_is_the_generated_one(tmp_path: Path) -> None:
    assert main([*GENERATE, "--out", str(tmp_path / "mosquitto.conf")]) == 0
    assert (tmp_path / "mosquitto.conf").read_text() == (COMPOSE / "mosquitto" / "mosquitto.conf").read_text()


def test_every_file_the_configs_name_is_mounted_where_they_look() -> None:
    server, broker = mounts("broker-server"), settings()
    named = [
        broker.bundle,
        broker.out,
        broker.test_data,
        broker.mqtt.ca_file,
        broker.mqtt.cert_file,
        broker.mqtt.key_file,
    ]
    for path in named:
        assert path is not None
        assert any(path == Path(t) or Path(t) in path.parents for t in server), f"{path} is not mounted"
    assert host_path(str(broker.bundle), server, COMPOSE) == COMPOSE / "bundle"
    assert str(broker.out).startswith("/var/lib/fedflock/") and server["/var/lib/fedflock"] == "server-data"
    broker_side = mounts("mosquitto")
    for key, named_path in conf_paths((COMPOSE / "mosquitto" / "mosquitto.conf").read_text()).items():
        if key == "persistence_location":
            assert broker_side[named_path.rstrip("/")] == "mosquitto-data"
        else:
            assert named_path in broker_side, f"mosquitto.conf {key} {named_path} is not mounted"
    assert "/mosquitto/pki/ca.key" not in broker_side and not any("ca.key" in s for s in server.values())


def test_ports_hosts_and_credentials_agree() -> None:
    doc, broker = compose(), settings()
    services = doc["services"]
    url = urlsplit(broker.mqtt.url)
    assert url.scheme == "mqtts" and url.hostname in services
    listener = re.search(r"^listener (\d+) ", (COMPOSE / "mosquitto/mosquitto.conf").read_text(), re.M)
    assert listener is not None and url.port == int(listener.group(1))
    assert [expand(p).rsplit(":", 1)[1] for p in services["mosquitto"]["ports"]] == [listener.group(1)]
    store = urlsplit(broker.store or "")
    pg_env = services["postgres"]["environment"]
    assert (store.scheme, store.hostname, store.port) == ("postgresql", "postgres", 5432)
    assert (store.username, store.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    assert store.password is None  # the password is an environment variable, never in the file
    server = services["broker-server"]
    assert server["environment"]["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]
    assert broker.ops.port is not None and broker.ops.host == "0.0.0.0"
    assert [expand(p) for p in server["ports"]] == [f"127.0.0.1:9100:{broker.ops.port}"]
    assert f"127.0.0.1:{broker.ops.port}/readyz" in " ".join(server["healthcheck"]["test"])
    acl_user = re.search(r"^user (\S+)$", (REPO / "deploy/mosquitto/acl.example").read_text(), re.M)
    assert acl_user is not None and broker.client_id == acl_user.group(1) == "fedflock-server"
    assert server["restart"] == "on-failure" and set(server["depends_on"]) == {"mosquitto", "postgres"}
    assert services["minio"]["profiles"] == ["s3"] and all(
        "profiles" not in s for n, s in services.items() if n != "minio"
    )


def test_env_example_sets_every_variable_compose_reads() -> None:
    used = set(_VAR.findall((COMPOSE / "compose.yaml").read_text()))
    lines = (COMPOSE / ".env.example").read_text().splitlines()
    defined = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    assert {name for name, _ in used} == defined


def test_the_blobs_snippet_uses_real_keys() -> None:
    from broker_server.blobs import parse_blobs_config

    text = (COMPOSE / "broker.toml").read_text()
    snippet = text[text.index("# [blobs]") :].replace("# ", "")
    config = parse_blobs_config(tomllib.loads(snippet)["blobs"])
    assert (config.backend, config.endpoint, config.bucket) == ("s3", "http://minio:9000", "fedflock")
    env = compose()["services"]["broker-server"]["environment"]
    assert {config.access_key_env, config.secret_key_env} <= set(env)


def test_the_server_image_installs_only_the_broker_extra_and_never_torch() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    installs = [line.rstrip(" \\") for line in re.findall(r"pip install [^\n]*", dockerfile)]
    assert len(installs) == 1 and installs[0].endswith('.whl)[broker]"') and "USER 10001" in dockerfile
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def closure(extra: str) -> set[str]:
        names: set[str] = set()
        for requirement in extras[extra]:
            name = re.split(r"[\[<>=; ]", requirement, maxsplit=1)[0]
            if name == "fedflock":
                for inner in requirement[requirement.index("[") + 1 : requirement.index("]")].split(","):
                    names |= closure(inner)
            else:
                names.add(name.lower())
        return names

    broker = closure("broker")
    assert {"onnxruntime", "paho-mqtt", "psycopg"} <= broker and "torch" not in broker
    assert "torch" in closure("export")  # the check can see torch where it is


def test_the_compose_layout_runs_on_a_real_mosquitto(tmp_path: Path) -> None:
    """Compose's mounts as a translation table: container paths -> the host files the operator made."""
    base = tmp_path / "deploy"
    pki = PkiStore(base / "pki")
    pki.init("fleet CA", 30)
    pki.issue_server(["127.0.0.1"], 30)  # the real one: --host mosquitto --host broker.example.org
    pki.issue_client("fedflock-server", 30, kind="service")
    device = pki.issue_client("dev-a", 30, kind="device")
    assert main(["pki", "acl", "--dir", str(base / "pki"), "--out", str(base / "mosquitto" / "fedflock.acl")]) == 0
    (base / "mosquitto" / "mosquitto.conf").write_text((COMPOSE / "mosquitto/mosquitto.conf").read_text())

    broker_side, port = mounts("mosquitto"), free_port()
    text = (base / "mosquitto/mosquitto.conf").read_text()
    for key, path in conf_paths(text).items():
        host = base / "data" if key == "persistence_location" else host_path(path, broker_side, base)
        host.parent.mkdir(parents=True, exist_ok=True)
        text = text.replace(f"{key} {path}", f"{key} {host}{'/' if key == 'persistence_location' else ''}")
    text = text.replace("user mosquitto", "user root").replace("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1")
    (base / "data").mkdir()
    (tmp_path / "run.conf").write_text(text)

    server_side, broker = mounts("broker-server"), settings()
    files: dict[str, Any] = {
        key: host_path(str(getattr(broker.mqtt, key)), server_side, base)
        for key in ("ca_file", "cert_file", "key_file")
    }
    mqtt = dataclasses.replace(broker.mqtt, url=f"mqtts://127.0.0.1:{port}", **files)
    assert mqtt.cert_file is not None and mqtt.cert_file.is_file()
    with ConfiguredMosquitto(tmp_path / "run.conf", host="127.0.0.1", port=port):
        tls = TlsConfig(ca_file=device.ca, cert_file=device.cert, key_file=device.key)
        receiver = MqttTransport(MqttConfig.from_url(f"mqtts://127.0.0.1:{port}", tls=tls, client_id="dev-a"))
        server = configured_server_transport(mqtt, broker.client_id or "")
        receiver.start()
        server.start()
        try:
            receiver.subscribe(f"{broker.server.topics.prefix}/devices/dev-a/tasks")
            server.publish(f"{broker.server.topics.prefix}/devices/dev-a/tasks", b"task", qos=1)
            message = receiver.receive(timeout=10)
            assert message is not None and message.payload == b"task"
        finally:
            server.close()
            receiver.close()
