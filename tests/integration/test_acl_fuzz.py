"""The generated ACL and hardened config (password mode) against a real Mosquitto, fuzzed.

Everything the broker runs comes from ``fedflock pki``: the CA and server certificate, the ACL
(``pki acl``), ``mosquitto.conf`` (``pki mosquitto-config --auth password``), and the password
file, whose ``$7$`` entries fedflock hashes itself. 1200 generated device identities (random ids
from the safe character set, lengths 1-64) plus hostile names (``+``, ``#``, ``/``, ``%u``,
``%c``, unicode, overlong) are exercised:

* every generated identity connects (in parallel batches), publishes under its own id, and
  tries to publish under the next identity's id: the server receives exactly the genuine ones;
* four connected devices each forge hundreds of publishes onto other devices' and hostile
  topics (refused, never delivered) and subscribe with wildcard and hostile filters: a device
  receives nothing but its own inbox and the model channel;
* anonymous clients, wrong passwords, hostile usernames, a revoked device (``pki revoke`` +
  SIGHUP) and a client-id takeover attempt are refused.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_server.mosquitto_process import free_port
from broker_server.pki.mosquitto_run import ConfiguredMosquitto
from broker_server.pki.passwords import hash_password
from edge_agent.errors import ConfigError, TransportError
from edge_agent.protocol.topics import Topics, validate_device_id
from edge_agent.transport.base import InboundMessage
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, TlsConfig
from fedflock.cli import main

pytestmark = pytest.mark.timeout(120)

PREFIX = "fuzz/v1"
TOPICS = Topics(PREFIX)
SERVER = "fedflock-server"
IDENTITIES = 1200
SAFE = string.ascii_letters + string.digits + "_-"
HOSTILE = [
    "+", "#", "dev/+", "a/b", "dev-a/#", "%u", "%c", "dev%u", "dév-ä", "設備-1", "dev-😀", "a" * 65,
    "dev a", "dev\ta", "../dev", "dev-a/", "/dev-a", "", "fedflock/v1", "$SYS",
]  # fmt: skip


def _password(user: str) -> str:
    return f"pw-{user}-{len(user)}"


def _generated_ids(rng: random.Random, count: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(rng.choice(SAFE) for _ in range(rng.choice([1, 2, 3, 8, 16, 32, 63, 64]))))
    return sorted(ids - {SERVER, "dev-a", "dev-b", "dev-c", "dev-d"})


@dataclass(frozen=True)
class Fleet:
    broker: ConfiguredMosquitto
    pki: Path
    conf_dir: Path
    ids: list[str]

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def client(self, user: str | None, password: str | None = None, client_id: str | None = None) -> MqttTransport:
        config = MqttConfig.from_url(
            self.url,
            tls=TlsConfig(ca_file=self.pki / "ca.crt"),
            client_id=client_id or f"c-{random.getrandbits(48):x}",
            username=user,
            password=password if password is not None or user is None else _password(user),
            protocol="5",
            connect_timeout=10.0,
            publish_timeout=5.0,
        )
        transport = MqttTransport(config)
        transport.start()
        return transport


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("acl-fuzz")
    pki, conf_dir, port = work / "pki", work / "conf", free_port()
    conf_dir.mkdir()
    ids = _generated_ids(random.Random(7), IDENTITIES)
    users = [SERVER, "dev-a", "dev-b", "dev-c", "dev-d", *ids]
    # one write of many entries; `pki passwd add` (one entry per call) is exercised below and in test_pki_cli
    rng = random.Random(8)
    lines = [f"{u}:{hash_password(_password(u), rng.randbytes(12))}\n" for u in users]
    (conf_dir / "passwords").write_text("".join(lines))
    (conf_dir / "passwords").chmod(0o600)
    for argv in (
        ["init", "--cn", "fuzz CA"],
        ["server-cert", "--host", "127.0.0.1", "--host", "localhost"],
        ["acl", "--out", str(conf_dir / "acl"), "--prefix", PREFIX],
        [
            "mosquitto-config", "--out", str(conf_dir / "mosquitto.conf"), "--auth", "password",
            "--acl-file", str(conf_dir / "acl"), "--password-file", str(conf_dir / "passwords"),
            "--persistence-location", str(work / "data"), "--port", str(port), "--bind", "127.0.0.1",
            "--run-as-user", "root", "--log-dest", f"file {work / 'mosquitto.log'}",
        ],
    ):  # fmt: skip
        assert main(["pki", *argv[:1], "--dir", str(pki), *argv[1:]]) == 0
    (work / "data").mkdir()
    with ConfiguredMosquitto(conf_dir / "mosquitto.conf", host="127.0.0.1", port=port) as broker:
        yield Fleet(broker=broker, pki=pki, conf_dir=conf_dir, ids=ids)


def _drain(transport: MqttTransport, quiet_s: float = 0.7, limit_s: float = 20.0) -> list[InboundMessage]:
    """Everything delivered until nothing more arrived for ``quiet_s``."""
    got: list[InboundMessage] = []
    deadline, last = time.monotonic() + limit_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
        message = transport.receive(timeout=0.05)
        if message is not None:
            got.append(message)
            last = time.monotonic()
    return got


def _refused_publish(transport: MqttTransport, topic: str) -> None:
    with pytest.raises(TransportError, match=r"Not authorized"):
        transport.publish(topic, b"forged", qos=1)


def test_hostile_names_are_refused_by_the_id_check() -> None:
    for name in HOSTILE:
        with pytest.raises(ConfigError, match="invalid device id"):
            validate_device_id(name)


def test_every_generated_identity_publishes_only_under_its_own_id(fleet: Fleet) -> None:
    server = fleet.client(SERVER)
    try:
        server.subscribe("#", qos=1)

        def one(index: int) -> None:
            user, victim = fleet.ids[index], fleet.ids[(index + 1) % len(fleet.ids)]
            device = fleet.client(user, client_id=victim)  # a foreign client id changes nothing
            try:
                device.publish(TOPICS.results(user), user.encode(), qos=1)
                _refused_publish(device, TOPICS.results(victim))
            finally:
                device.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(len(fleet.ids))))
        got = _drain(server)
        assert len(fleet.ids) >= 1000
        assert sorted((m.topic, m.payload) for m in got) == sorted((TOPICS.results(u), u.encode()) for u in fleet.ids)
    finally:
        server.close()


def _forged_topics(others: list[str]) -> list[str]:
    # wildcards cannot be published to, and Mosquitto drops a client that sends a control character
    usable = [name for name in HOSTILE if name and not set(name) & set("+#\t")]
    weird = [f"{PREFIX}/devices/{name}/results" for name in usable]
    return [
        *(TOPICS.device(other, kind) for other in others for kind in ("status", "results", "tasks")),
        *weird,
        f"{PREFIX}/devices/dev-a/results/extra",
        f"{PREFIX}/devices/dev-a",
        f"{PREFIX}/models/current",
        f"{PREFIX}/models/dev-a",
        f"{PREFIX}/devices/%u/results",
        f"{PREFIX}/devices/%c/results",
        "fedflock/v1/devices/dev-a/results",
        "$SYS/broker/x",
        "dev-a",
    ]


FILTERS = [
    "#", f"{PREFIX}/#", f"{PREFIX}/devices/#", f"{PREFIX}/devices/+/tasks", f"{PREFIX}/devices/+/+",
    "+/+/devices/+/tasks", "+/#", f"{PREFIX}/+/+/tasks", f"{PREFIX}/devices/%u/tasks", f"{PREFIX}/devices/%c/tasks",
    f"{PREFIX}/devices/+/results", f"{PREFIX}/devices/+/status", "$SYS/#", f"{PREFIX}/devices/設備-1/tasks",
]  # fmt: skip


def test_connected_devices_cannot_forge_or_read_anything_of_another(fleet: Fleet) -> None:
    names = ["dev-a", "dev-b", "dev-c", "dev-d"]
    server = fleet.client(SERVER)
    devices = {name: fleet.client(name) for name in names}
    try:
        server.subscribe("#", qos=1)
        for index, (name, device) in enumerate(devices.items()):
            others = [n for n in names if n != name] + fleet.ids[index * 250 : (index + 1) * 250]
            for topic in _forged_topics(others):
                _refused_publish(device, topic)
            for pattern in [*FILTERS, *(TOPICS.tasks(o) for o in others[:40])]:
                try:  # Mosquitto may grant a wildcard subscription and filter per message; either is fine
                    device.subscribe(pattern, qos=1)
                except TransportError as exc:
                    assert "authori" in str(exc).lower(), exc
        assert _drain(server, quiet_s=0.5) == []  # not one forged message reached the server

        for user in [*names, *fleet.ids]:
            server.publish(TOPICS.tasks(user), f"task for {user}".encode(), qos=1)
            server.publish(TOPICS.status(user), b"status", qos=1)
        server.publish(TOPICS.model_channel("current"), b"model v1", qos=1)
        for name, device in devices.items():
            got = {(m.topic, m.payload) for m in _drain(device)}
            assert got == {
                (TOPICS.tasks(name), f"task for {name}".encode()),
                (TOPICS.model_channel("current"), b"model v1"),
            }
    finally:
        for transport in (server, *devices.values()):
            transport.close()


@pytest.mark.parametrize("user", ["dev-a", *HOSTILE[:12]])
def test_wrong_passwords_and_hostile_usernames_are_refused(fleet: Fleet, user: str) -> None:
    with pytest.raises(TransportError, match=r"Bad user name or password|Not authorized"):
        fleet.client(user, password="not-the-password")


def test_anonymous_clients_are_refused(fleet: Fleet) -> None:
    with pytest.raises(TransportError, match=r"Not authorized|Bad user name or password"):
        fleet.client(None)


def test_a_second_login_under_a_foreign_client_id_does_not_take_over(fleet: Fleet) -> None:
    a = fleet.client("dev-a", client_id="dev-a")
    b = fleet.client("dev-b", client_id="dev-a")  # use_username_as_clientid: b becomes "dev-b"
    try:
        time.sleep(0.3)
        assert a.is_connected() and b.is_connected()
        a.publish(TOPICS.results("dev-a"), b"still here", qos=1)
    finally:
        a.close()
        b.close()


def test_a_revoked_device_is_cut_off_and_refused_after_a_reload(fleet: Fleet) -> None:
    victim = fleet.ids[0]
    server, device = fleet.client(SERVER), fleet.client(victim)
    try:
        server.subscribe(f"{PREFIX}/#", qos=1)
        device.subscribe(TOPICS.tasks(victim), qos=1)
        argv = ["pki", "revoke", victim, "--dir", str(fleet.pki), "--password-file", str(fleet.conf_dir / "passwords")]
        argv += ["--acl-file", str(fleet.conf_dir / "acl"), "--prefix", PREFIX]
        assert main([*argv, "--reload-pid", str(fleet.broker.pid)]) == 0
        time.sleep(0.3)
        # Mosquitto 2.0.11 disconnects a client whose password entry vanished on reload (and the ACL
        # denies it everything in case it is still connected); its automatic reconnects are refused
        with pytest.raises(TransportError, match=r"Not authorized|not connected"):
            device.publish(TOPICS.results(victim), b"forged", qos=1)
        server.publish(TOPICS.tasks(victim), b"for a revoked device", qos=1)
        assert _drain(device, quiet_s=0.5) == []
        assert _drain(server, quiet_s=0.2) == [InboundMessage(TOPICS.tasks(victim), b"for a revoked device")]
        with pytest.raises(TransportError, match=r"Bad user name or password|Not authorized"):
            fleet.client(victim).close()
    finally:
        server.close()
        device.close()
