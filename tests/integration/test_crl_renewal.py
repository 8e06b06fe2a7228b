"""CRL renewal against a real Mosquitto 2 with the generated mutual-TLS config (issue #7).

An expired CRL locks **every** client out, revoked or not: the client sees the TLS alert
"certificate expired" (its own certificate is fine), Mosquitto logs only "certificate verify
failed". The command of the shipped systemd unit (``deploy/broker/fedflock-crl-renew.service``,
``fedflock pki crl --renew --reload-pid-file``, its paths pointed at this test's) re-signs it (it
is due) and SIGHUPs the broker named by the pid file; then the valid device connects while the
revoked one is still refused. A second run finds nothing due, leaves the file alone and sends no
signal.
"""

from __future__ import annotations

import configparser
import datetime
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_server.pki.mosquitto_run import RELOAD_SETTLE_S
from broker_server.pki.store import PkiStore, utc_now
from edge_agent.errors import TransportError
from fedflock.cli import main
from tests.integration.test_acl_certificates import Broker, generated_mtls_broker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "broker"


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / name).read_text())
    return unit


def unit_command(pki: Path, pid_file: Path) -> list[str]:
    """The service's ExecStart as ``fedflock`` arguments, with this test's PKI and pid file."""
    argv = shlex.split(_unit("fedflock-crl-renew.service")["Service"]["ExecStart"])
    assert argv[0].endswith("/fedflock")
    paths = {"/etc/fedflock/pki": str(pki), "/run/mosquitto/mosquitto.pid": str(pid_file)}
    return [paths.get(arg, arg) for arg in argv[1:]]


def test_the_timer_runs_the_service_daily_and_catches_up() -> None:
    timer = _unit("fedflock-crl-renew.timer")["Timer"]
    assert timer["OnCalendar"] == "daily" and timer["Persistent"] == "true"
    assert timer["Unit"] == "fedflock-crl-renew.service"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from generated_mtls_broker(tmp_path_factory.mktemp("crl"))


def test_renewing_an_expired_crl_lets_valid_devices_in_and_keeps_revoked_ones_out(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = str(broker.pki)
    assert main(["pki", "revoke", "dev-b", "--dir", pki]) == 0
    # the CRL as it looks after a month without renewal: its next update has passed
    past = utc_now() - datetime.timedelta(days=3)
    PkiStore(broker.pki, clock=lambda: past).write_crl(days=1)
    broker.process.reload()
    with pytest.raises(TransportError, match="alert certificate expired"):
        broker.device("dev-a")

    pid_file = broker.conf_dir / "mosquitto.pid"
    pid_file.write_text(f"{broker.process.pid}\n")
    capsys.readouterr()
    command = unit_command(broker.pki, pid_file)
    assert command[:3] == ["pki", "crl", "--renew"] and "--reload-pid-file" in command
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "re-signed, valid for 30 days (the CRL expired at" in out and f"sent SIGHUP to {broker.process.pid}" in out
    time.sleep(RELOAD_SETTLE_S)
    broker.device("dev-a").close()  # the fleet is back
    with pytest.raises(TransportError, match="certificate revoked"):
        broker.device("dev-b")

    renewed = (broker.pki / "crl.pem").read_bytes()
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "not due, unchanged" in out and "SIGHUP" not in out
    assert (broker.pki / "crl.pem").read_bytes() == renewed
