"""The PKI library and ``fedflock pki`` commands: pure pieces and their error messages.

The real-broker proofs are tests/integration/test_acl_fuzz.py, test_acl_certificates.py and
test_enroll.py; these check the parts one by one.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from broker_server.pki.mosquitto_files import BrokerConfigSpec, acl_text, mosquitto_conf_text
from broker_server.pki.passwords import PasswordFile, hash_password, verify_password
from broker_server.pki.store import PkiStore, utc_now
from broker_server.pki.tokens import TokenRefused, parse_ttl
from edge_agent.errors import ConfigError
from fedflock.cli import main


def test_password_hashes_match_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-b", "-c", str(tmp_path / "p"), "dev-1", "s3cret"], check=True, capture_output=True)
    stored = PasswordFile(tmp_path / "p").entries()["dev-1"]
    assert verify_password("s3cret", stored) and not verify_password("s3cret!", stored)
    salt = __import__("base64").b64decode(stored.split("$")[3])
    assert hash_password("s3cret", salt) == stored  # the same bytes mosquitto_passwd wrote


def test_the_password_file_keeps_other_entries_and_is_private(tmp_path: Path) -> None:
    passwords = PasswordFile(tmp_path / "passwords")
    passwords.add("dev-a", "a")
    passwords.add("dev-b", "b")
    with pytest.raises(ConfigError, match="already has an entry for 'dev-a'"):
        passwords.add("dev-a", "again")
    assert passwords.remove("dev-a") and not passwords.remove("dev-a")
    assert list(passwords.entries()) == ["dev-b"] and verify_password("b", passwords.entries()["dev-b"])
    assert stat.S_IMODE(passwords.path.stat().st_mode) == 0o600


def test_tokens_are_single_use_expire_and_are_stored_only_as_hashes(tmp_path: Path) -> None:
    now = [utc_now()]
    store = PkiStore(tmp_path / "pki", clock=lambda: now[0])
    store.init("CA", 30)
    token, late = store.issue_token("dev-a", 60), store.issue_token("dev-b", 60)
    assert token not in (tmp_path / "pki" / "tokens.json").read_text()
    assert store.redeem_token(token) == "dev-a"
    with pytest.raises(TokenRefused, match="already used"):
        store.redeem_token(token)
    now[0] += datetime.timedelta(seconds=61)
    with pytest.raises(TokenRefused, match="expired"):
        store.redeem_token(late)
    with pytest.raises(TokenRefused, match="unknown"):
        store.redeem_token("not-a-token")
    with pytest.raises(ConfigError, match="invalid device id"):
        store.issue_token("dev/+", 60)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("30", 30)])
def test_ttl_parsing(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "0", "31d", "1w"])
def test_bad_ttls_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--ttl"):
        parse_ttl(text)


def test_certificates_names_usages_and_revocation(tmp_path: Path) -> None:
    store = PkiStore(tmp_path / "pki")
    store.init("CA", 30)
    store.issue_server(["broker.example.org", "10.0.0.1"], 30)
    server = x509.load_pem_x509_certificate(store.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    files = store.issue_client("dev-a", 30, kind="device")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=dev-a"
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600 and stat.S_IMODE(store.ca_key.stat().st_mode) == 0o600
    assert [r.serial for r in store.revoke("dev-a")] == [f"{cert.serial_number:x}"]
    crl = x509.load_pem_x509_crl(store.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert store.denied() == ["dev-a"]
    store.issue_client("dev-a", 30, kind="device")  # re-issued: no longer denied
    assert store.denied() == []


def test_the_acl_confines_devices_by_username_and_denies_revoked_names() -> None:
    text = acl_text("fed/v1", denied=["dev-x"])
    assert "pattern write fed/v1/devices/%u/results" in text and "%c" not in text.split("\n\n", 1)[1]
    assert "user fedflock-server\ntopic readwrite fed/v1/#" in text
    assert "user dev-x\ntopic deny #" in text
    for prefix in ("", "fed/+", "fed/#", "a//b", "fed/%u"):
        with pytest.raises(ConfigError, match="--prefix"):
            acl_text(prefix)


def test_the_broker_config_needs_what_its_mode_needs(tmp_path: Path) -> None:
    common = dict(
        cafile=tmp_path, certfile=tmp_path, keyfile=tmp_path, acl_file=tmp_path, persistence_location=tmp_path
    )
    with pytest.raises(ConfigError, match="--password-file"):
        BrokerConfigSpec(auth="password", **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--crlfile"):
        BrokerConfigSpec(auth="certificate", **common)  # type: ignore[arg-type]
    text = mosquitto_conf_text(BrokerConfigSpec(auth="certificate", crlfile=tmp_path / "crl.pem", **common))  # type: ignore[arg-type]
    for line in (
        "allow_anonymous false",
        "persistence true",
        "require_certificate true",
        "use_identity_as_username true",
    ):
        assert f"\n{line}\n" in text


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = str(tmp_path / "pki")
    assert main(["pki", "device-cert", "dev-a", "--dir", pki]) == 2
    assert "no CA in" in capsys.readouterr().err
    assert main(["pki", "init", "--dir", pki]) == 0
    assert main(["pki", "init", "--dir", pki]) == 2
    assert "a CA already exists" in capsys.readouterr().err
    assert main(["pki", "device-cert", "dév/#", "--dir", pki]) == 2
    assert "invalid device id" in capsys.readouterr().err
    assert main(["pki", "device-cert", "fedflock-server", "--dir", pki]) == 2
    assert main(["pki", "revoke", "dev-nobody", "--dir", pki]) == 2
    assert "unknown device 'dev-nobody'" in capsys.readouterr().err
    assert main(["pki", "passwd", "remove", "dev-a", "--dir", pki, "--password-file", str(tmp_path / "pw")]) == 2
    assert "unknown device 'dev-a'" in capsys.readouterr().err
    assert main(["pki", "passwd", "add", "dev-a", "--dir", pki, "--password-file", str(tmp_path / "pw")]) == 0
    assert "dev-a" in PasswordFile(tmp_path / "pw").entries()


def test_agent_enroll_refuses_plain_http_and_missing_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "enroll", "--url", "http://x/v1/enroll", "--token", "t", "--ca-file", "c", "--out", "o"]) == 2
    assert "must be https://" in capsys.readouterr().err
    assert main(["agent", "enroll", "--token", "t"]) == 2
    assert "needs --url, --ca-file, --out" in capsys.readouterr().err


def _crl_expiry(store: PkiStore) -> datetime.datetime:
    expiry = x509.load_pem_x509_crl(store.crl.read_bytes()).next_update_utc
    assert expiry is not None
    return expiry


def test_the_crl_is_renewed_only_when_due(tmp_path: Path) -> None:
    now = [utc_now()]
    store = PkiStore(tmp_path / "pki", clock=lambda: now[0])
    store.init("CA", 365)  # the first CRL: 30 days
    before = store.crl.read_bytes()
    assert store.renew_crl(days=30, renew_before_days=10) is None and store.crl.read_bytes() == before
    now[0] += datetime.timedelta(days=19, hours=23)
    assert store.renew_crl(days=30, renew_before_days=10) is None and store.crl.read_bytes() == before
    now[0] += datetime.timedelta(hours=2)  # now less than 10 days are left
    reason = store.renew_crl(days=30, renew_before_days=10)
    assert reason is not None and "less than 10 day(s) away" in reason
    assert _crl_expiry(store) - now[0] > datetime.timedelta(days=29)
    renewed = store.crl.read_bytes()
    assert store.renew_crl(days=30, renew_before_days=10) is None and store.crl.read_bytes() == renewed  # idempotent
    now[0] += datetime.timedelta(days=31)  # missed every run: expired, so Mosquitto refuses everyone
    assert "expired" in (store.renew_crl() or "")
    assert sorted(p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".lock") == []


def test_a_crl_that_does_not_match_the_index_or_the_ca_is_renewed(tmp_path: Path) -> None:
    store = PkiStore(tmp_path / "pki")
    store.init("CA", 365)
    stale = store.crl.read_bytes()
    serial = int(store.issue_client("dev-a", 30, kind="device").record.serial, 16)
    store.revoke("dev-a")
    store.crl.write_bytes(stale)  # the CRL from before the revocation (a restored backup)
    assert store.renew_crl() == "the CRL lists 0 revoked certificate(s), the index 1"
    assert x509.load_pem_x509_crl(store.crl.read_bytes()).get_revoked_certificate_by_serial_number(serial) is not None
    other = PkiStore(tmp_path / "other")
    other.init("another CA", 30)
    store.crl.write_bytes(other.crl.read_bytes())
    assert store.renew_crl() == "the CRL is not signed by this CA"
    store.crl.write_bytes(b"garbage")
    assert store.renew_crl() == "the CRL does not parse"
    store.crl.unlink()
    assert store.renew_crl() == "there is no CRL" and store.crl.is_file()
    with pytest.raises(ConfigError, match=r"--renew-before \(30\) must be less than --days \(30\)"):
        store.renew_crl(days=30, renew_before_days=30)


@pytest.mark.timeout(30)  # enroll-server would serve forever if its flags were not refused
def test_pki_crl_renew_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = str(tmp_path / "pki")
    assert main(["pki", "init", "--dir", pki]) == 0
    capsys.readouterr()
    crl = tmp_path / "pki" / "crl.pem"
    before = crl.read_bytes()
    assert main(["pki", "crl", "--renew", "--dir", pki]) == 0
    assert "not due, unchanged" in capsys.readouterr().out and crl.read_bytes() == before
    # due: the 30-day CRL init wrote has less than the 45 days left that this schedule wants
    assert main(["pki", "crl", "--renew", "--days", "60", "--renew-before", "45", "--dir", pki]) == 0
    assert "re-signed, valid for 60 days" in capsys.readouterr().out and crl.read_bytes() != before
    # reloading: a pid file must name a running Mosquitto, never another process
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    assert main(["pki", "crl", "--dir", pki, "--reload-pid-file", str(pid_file)]) == 2
    assert "not mosquitto: stale pid file?" in capsys.readouterr().err
    pid_file.write_text("garbage\n")
    assert main(["pki", "crl", "--dir", pki, "--reload-pid-file", str(pid_file)]) == 2
    assert "is not a process id" in capsys.readouterr().err
    assert main(["pki", "crl", "--dir", pki, "--reload-pid-file", str(tmp_path / "none")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    # the enrollment endpoint's rate limits are checked before it binds anything
    assert main(["pki", "enroll-server", "--dir", pki, "--listen", "127.0.0.1:0", "--client-rate", "0"]) == 2
    assert "--client-rate must be a positive number" in capsys.readouterr().err


def test_enrollment_tokens_never_start_with_a_dash() -> None:
    # a token is pasted after --token on a command line: a leading "-" reads as an option there
    # (1 in 64 URL-safe tokens would start with one)
    from broker_server.pki.tokens import TOKEN_BYTES, new_token

    tokens = [new_token() for _ in range(2000)]
    assert not any(token.startswith("-") for token in tokens)
    assert len(set(tokens)) == 2000 and all(len(token) >= TOKEN_BYTES for token in tokens)
