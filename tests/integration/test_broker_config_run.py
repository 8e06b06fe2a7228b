"""`python -m fedflock broker --config broker.toml` as a real process against real Mosquitto brokers.

* Plain Mosquitto (the ``mosquitto`` fixture), two real agent processes, two FedAvg rounds: the
  file sets everything, ``--rounds 2`` on the command line overrides its ``rounds = 50``, and the
  relative ``out`` and ``test_data`` resolve against the file's directory.
* A TLS Mosquitto that wants a password: the server connects with the ``[mqtt]`` table's
  ``mqtts://`` url, CA file and password file (readiness probe answers 200), and a wrong password
  ends the command promptly with exit code 2 and the broker's reason.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_server.mosquitto_process import MosquittoProcess, MosquittoTls, free_port
from tests.fixtures import digits_split, write_npz

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
USER, SECRET = "fedflock-server", "s3rver secret"


def fedflock(*args: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fedflock", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(120)
def test_broker_from_a_config_file_runs_two_rounds_with_real_agents(mosquitto, digits_bundle, tmp_path) -> None:
    devices, test = digits_split(2, alpha=1.0, seed=3)
    etc = tmp_path / "etc"
    etc.mkdir()
    write_npz(etc / "test.npz", test)
    prefix = "brokerconf/v1"
    config = etc / "broker.toml"
    config.write_text(
        f"""
[server]
bundle = "{digits_bundle.directory}"
out = "server-out"
test_data = "test.npz"
rounds = 50
clients_per_round = 2
min_clients = 2
wait_for_clients_s = 60
round_timeout_s = 60
local_epochs = 1

[mqtt]
url = "{mosquitto.url}"
client_id = "brokerconf-server"
topic_prefix = "{prefix}"

[codecs]
offer = ["fp32"]
"""
    )
    agents = [
        fedflock(
            "agent",
            "--bundle",
            str(digits_bundle.directory),
            "--data",
            str(write_npz(tmp_path / f"d{i}.npz", data)),
            "--device-id",
            f"conf-agent-{i}",
            "--mqtt-url",
            mosquitto.url,
            "--topic-prefix",
            prefix,
            log=tmp_path / f"agent-{i}.log",
        )
        for i, data in enumerate(devices)
    ]
    try:
        server = subprocess.run(
            [sys.executable, "-m", "fedflock", "broker", "--config", str(config), "--rounds", "2"],
            cwd=tmp_path,  # the out dir must come from the file's directory, not the cwd
            env=ENV,
            capture_output=True,
            text=True,
            timeout=100,
        )
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=20)
    logs = "\n".join((tmp_path / f"agent-{i}.log").read_text() for i in range(2))
    assert server.returncode == 0, server.stdout + server.stderr + logs
    out = etc / "server-out"
    assert f"2/2 rounds completed; metrics in {out}" in server.stdout
    results = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["completed"], r["reported"]) for r in results] == [(1, True, 2), (2, True, 2)], results
    assert all(r["test_accuracy"] is not None for r in results)  # test_data found next to the file
    assert sorted(p.name for p in (out / "models").iterdir()) == ["v000000", "v000001", "v000002"]
    assert not (tmp_path / "fedflock-server").exists()
    assert logs.count("trained") == 4, logs


# -- TLS and a password --------------------------------------------------------------------------


def _issue(cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, **extensions: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


@pytest.fixture(scope="module")
def tls_password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoProcess, Path]]:
    """A TLS-only Mosquitto refusing anonymous clients, and the directory holding its ``ca.crt``."""
    pki = tmp_path_factory.mktemp("broker-conf-pki")
    ca = _issue("broker-conf test CA", None)
    _write_pem(pki / "ca", *ca)
    _write_pem(pki / "server", *_issue("localhost", ca))
    work = tmp_path_factory.mktemp("mosquitto-conf-tls")
    passwords = work / "passwords"
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-b", "-c", str(passwords), USER, SECRET], check=True, capture_output=True)
    passwords.chmod(0o600)
    tls = MosquittoTls(cafile=pki / "ca.crt", certfile=pki / "server.crt", keyfile=pki / "server.key")
    with MosquittoProcess(work, allow_anonymous=False, extra_config=(f"password_file {passwords}",), tls=tls) as broker:
        yield broker, pki


def _tls_config(etc: Path, broker: MosquittoProcess, pki: Path, bundle: Path, secret: str, ops_port: int) -> Path:
    etc.mkdir()
    shutil.copy(pki / "ca.crt", etc / "ca.pem")
    (etc / "server.password").write_text(secret + "\n")
    (etc / "server.password").chmod(0o600)
    config = etc / "broker.toml"
    config.write_text(
        f"""
[server]
bundle = "{bundle}"
out = "out"
rounds = 1
min_clients = 1
wait_for_clients_s = 60

[mqtt]
url = "mqtts://localhost:{broker.port}"
username = "{USER}"
password_file = "server.password"
ca_file = "ca.pem"
topic_prefix = "brokerconf-tls/v1"

[ops]
port = {ops_port}
"""
    )
    return config


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.timeout(90)
def test_broker_reaches_a_tls_broker_with_a_password_file(tls_password_broker, digits_bundle, tmp_path) -> None:
    broker, pki = tls_password_broker
    port = free_port()
    config = _tls_config(tmp_path / "etc", broker, pki, digits_bundle.directory, SECRET, port)
    process = fedflock("broker", "--config", str(config), log=tmp_path / "server.log")
    try:
        deadline, ready = time.monotonic() + 60, 0
        while time.monotonic() < deadline and ready != 200:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            ready = _status(f"http://127.0.0.1:{port}/readyz")
            time.sleep(0.2)
        assert ready == 200, (tmp_path / "server.log").read_text()  # connected, subscribed, model announced
    finally:
        process.kill()
        process.wait(timeout=20)


@pytest.mark.timeout(60)
def test_a_wrong_password_ends_the_broker_command_with_the_reason(tls_password_broker, digits_bundle, tmp_path) -> None:
    broker, pki = tls_password_broker
    config = _tls_config(tmp_path / "etc", broker, pki, digits_bundle.directory, "not the secret", free_port())
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fedflock", "broker", "--config", str(config)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"fedflock broker: error [transport_error]: mqtts://localhost:{broker.port} refused the connection:" in (
        result.stderr
    )
    assert "Bad user name or password" in result.stderr or "Not authorized" in result.stderr, result.stderr
    assert time.monotonic() - began < 30  # a refusal, not a connect timeout
