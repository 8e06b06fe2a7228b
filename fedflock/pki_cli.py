"""``fedflock pki``: the CA, certificates, revocation, passwords, the ACL, mosquitto.conf, enrollment.

Every subcommand works on a state directory (``--dir``, default ``./pki``; layout in
``broker_server/pki/store.py``) and imports ``broker_server.pki`` (and so ``cryptography``) only
when it runs. docs/security.md walks through a deployment.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import ConfigError

if TYPE_CHECKING:  # imported when a subcommand runs: building the parser needs no cryptography
    from broker_server.pki.store import PkiStore

__all__ = ["add_pki_arguments", "run_pki"]

SERVER_USER = "fedflock-server"  # broker_server.pki.mosquitto_files.SERVER_USER, without importing it here


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("pki"), help="the PKI state directory (default ./pki)")


def _reload(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--reload-pid", type=int, default=None, help="send SIGHUP to this Mosquitto pid afterwards")
    target.add_argument(
        "--reload-pid-file", type=Path, default=None, help="... to the pid in this file (Mosquitto's pid_file)"
    )


def add_pki_arguments(pki: argparse.ArgumentParser) -> None:
    sub = pki.add_subparsers(dest="pki_command", required=True)
    init = sub.add_parser("init", help="create the CA (refuses to overwrite one)")
    init.add_argument("--cn", default="fedflock CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650)
    server = sub.add_parser("server-cert", help="the broker's TLS certificate (also used by enroll-server)")
    server.add_argument("--host", action="append", required=True, help="DNS name or IP address (repeatable)")
    server.add_argument("--days", type=int, default=825)
    device = sub.add_parser("device-cert", help="a device certificate and key made here (CN = the device id)")
    device.add_argument("device_id")
    device.add_argument("--days", type=int, default=365)
    service = sub.add_parser("service-cert", help="the aggregation server's client certificate (mutual TLS)")
    service.add_argument("name", nargs="?", default=SERVER_USER)
    service.add_argument("--days", type=int, default=365)
    revoke = sub.add_parser("revoke", help="revoke a device: CRL, password entry, ACL deny, reload")
    revoke.add_argument("device_id")
    revoke.add_argument("--password-file", type=Path, default=None, help="also remove its password entry")
    revoke.add_argument("--acl-file", type=Path, default=None, help="also rewrite this ACL (denies the device)")
    crl = sub.add_parser("crl", help="re-sign the CRL (do it before its next-update time; default 30 days)")
    crl.add_argument("--days", type=int, default=30, help="validity of the new CRL")
    crl.add_argument("--renew", action="store_true", help="only if due (a timer runs this daily; reload only then)")
    crl.add_argument("--renew-before", type=int, default=10, help="--renew: due this many days before expiry")
    passwd = sub.add_parser("passwd", help="Mosquitto password-file entries")
    passwd.add_argument("action", choices=("add", "remove"))
    passwd.add_argument("device_id")
    passwd.add_argument("--password-file", type=Path, required=True)
    passwd.add_argument("--password-from", type=Path, default=None, help="read the password from this file")
    passwd.add_argument("--replace", action="store_true", help="add: replace an existing entry")
    acl = sub.add_parser("acl", help="write the Mosquitto ACL")
    acl.add_argument("--out", type=Path, required=True)
    conf = sub.add_parser("mosquitto-config", help="write a hardened mosquitto.conf")
    conf.add_argument("--out", type=Path, required=True)
    conf.add_argument("--auth", choices=("password", "certificate"), default="certificate")
    conf.add_argument("--acl-file", type=Path, required=True)
    conf.add_argument("--password-file", type=Path, default=None)
    conf.add_argument("--persistence-location", type=Path, default=Path("/var/lib/mosquitto"))
    conf.add_argument("--port", type=int, default=8883)
    conf.add_argument("--bind", default="0.0.0.0")
    conf.add_argument("--run-as-user", default=None, help="Mosquitto's `user` line (default: Mosquitto's own)")
    conf.add_argument("--log-dest", default="stderr", help="e.g. stderr, syslog, 'file /var/log/mosquitto.log'")
    token = sub.add_parser("token", help="print a one-time enrollment token for a device")
    token.add_argument("device_id")
    token.add_argument("--ttl", default="1h", help="e.g. 15m, 1h, 2d (at most 30d)")
    serve = sub.add_parser("enroll-server", help="serve the HTTPS enrollment endpoint")
    serve.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT")
    serve.add_argument("--cert-days", type=int, default=365)
    serve.add_argument("--password-file", type=Path, default=None, help="allow password enrollment into this file")
    serve.add_argument("--mqtt-url", default=None, help="the broker URL devices are told to use")
    serve.add_argument("--client-rate", type=float, default=1.0, help="requests/s per client address (refill)")
    serve.add_argument("--client-burst", type=float, default=20.0, help="requests at once per client address")
    serve.add_argument("--global-rate", type=float, default=20.0, help="requests/s over all clients")
    serve.add_argument("--global-burst", type=float, default=200.0, help="requests at once over all clients")
    serve.add_argument("--failed-token-cost", type=float, default=10.0, help="requests a refused token counts as")
    sub.add_parser("list", help="the certificates issued, revoked, and tokens pending")
    signing = sub.add_parser("signing-key", help="an Ed25519 key pair that signs bundles and MODELs")
    signing.add_argument("--name", default="release", help="files DIR/signing/NAME.key (0600) and NAME.pub")
    signing.add_argument("--force", action="store_true", help="replace an existing key pair")
    sign = sub.add_parser("sign-bundle", help="write BUNDLE/manifest.sig (files checked against the manifest)")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the private key (fedflock pki signing-key)")
    for parser in sub.choices.values():
        _common(parser)
    for name in ("revoke", "crl", "passwd", "enroll-server"):
        _reload(sub.choices[name])
    for name in ("revoke", "acl"):
        sub.choices[name].add_argument("--prefix", default="fedflock/v1", help="the federation's topic prefix")
        sub.choices[name].add_argument("--server-user", default=SERVER_USER)


def run_pki(args: argparse.Namespace) -> int:
    from broker_server.pki import store

    return _HANDLERS[args.pki_command](store.PkiStore(args.dir), args)


def _init(store: PkiStore, args: argparse.Namespace) -> int:
    store.init(args.cn, args.days)
    print(f"CA created: {store.ca_cert} (key {store.ca_key}, mode 0600); CRL {store.crl}")
    return 0


def _server_cert(store: PkiStore, args: argparse.Namespace) -> int:
    record = store.issue_server(args.host, args.days)
    print(f"server certificate {store.server_cert} (key {store.server_key}) for {', '.join(args.host)}")
    print(f"serial {record.serial}, valid until {record.not_after}")
    return 0


def _device_cert(store: PkiStore, args: argparse.Namespace) -> int:
    from edge_agent.protocol.topics import validate_device_id

    if args.device_id == SERVER_USER:
        raise ConfigError(
            f"device id {SERVER_USER!r} is the aggregation server's user: use `fedflock pki service-cert`"
        )
    files = store.issue_client(validate_device_id(args.device_id), args.days, kind="device")
    print(f"{files.cert}\n{files.key} (0600)\n{files.ca}\nvalid until {files.record.not_after}")
    return 0


def _service_cert(store: PkiStore, args: argparse.Namespace) -> int:
    from edge_agent.protocol.topics import validate_device_id

    files = store.issue_client(validate_device_id(args.name), args.days, kind="service")
    print(f"{files.cert}\n{files.key} (0600)\n{files.ca}\nvalid until {files.record.not_after}")
    return 0


def _revoke(store: PkiStore, args: argparse.Namespace) -> int:
    from broker_server.pki.passwords import PasswordFile
    from edge_agent.protocol.topics import validate_device_id

    name = validate_device_id(args.device_id)
    had_password = args.password_file is not None and name in PasswordFile(args.password_file).entries()
    if not store.known(name) and not had_password:
        raise ConfigError(f"unknown device {name!r}: no certificate or password entry (see `fedflock pki list`)")
    revoked = store.revoke(name)
    print(f"revoked {len(revoked)} certificate(s) of {name}; CRL {store.crl} rewritten")
    if had_password:
        PasswordFile(args.password_file).remove(name)
        print(f"removed {name} from {args.password_file}")
    if args.acl_file is not None:
        _write_acl(store, args)
    _reload_mosquitto(args)
    return 0


def _crl(store: PkiStore, args: argparse.Namespace) -> int:
    if not args.renew:
        store.write_crl(args.days)
        print(f"CRL {store.crl} re-signed, valid for {args.days} days")
        _reload_mosquitto(args)
        return 0
    from broker_server.pki.crl_renewal import next_update

    reason = store.renew_crl(args.days, args.renew_before)
    if reason is None:
        expiry = next_update(store.crl.read_bytes())
        print(f"CRL {store.crl} valid until {expiry.isoformat() if expiry else '?'}: not due, unchanged")
        return 0
    print(f"CRL {store.crl} re-signed, valid for {args.days} days ({reason})")
    _reload_mosquitto(args)
    return 0


def _passwd(store: PkiStore, args: argparse.Namespace) -> int:
    from broker_server.pki.passwords import PasswordFile, new_password
    from edge_agent.protocol.topics import validate_device_id

    name = validate_device_id(args.device_id)
    passwords = PasswordFile(args.password_file)
    if args.action == "remove":
        if not passwords.remove(name):
            raise ConfigError(f"unknown device {name!r}: no entry in {args.password_file}")
        print(f"removed {name} from {args.password_file}")
    else:
        generated = args.password_from is None
        password = new_password() if generated else _read_secret(args.password_from)
        passwords.add(name, password, replace=args.replace)
        if store.ca_cert.exists():
            store.set_denied(name, False)
        print(
            f"added {name} to {args.password_file}" + (f"; its password (shown once): {password}" if generated else "")
        )
    _reload_mosquitto(args)
    return 0


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--password-from {path}: cannot read it: {exc}") from exc
    if not secret:
        raise ConfigError(f"--password-from {path}: empty")
    return secret


def _acl(store: PkiStore, args: argparse.Namespace) -> int:
    args.acl_file = args.out
    _write_acl(store, args)
    return 0


def _write_acl(store: PkiStore, args: argparse.Namespace) -> None:
    from broker_server.pki.mosquitto_files import acl_text
    from edge_agent.files import atomic_write

    denied = store.denied() if store.root.exists() else []
    atomic_write(args.acl_file, acl_text(args.prefix, args.server_user, denied).encode())
    print(f"ACL for prefix {args.prefix!r} written to {args.acl_file} ({len(denied)} revoked name(s) denied)")


def _mosquitto_config(store: PkiStore, args: argparse.Namespace) -> int:
    from broker_server.pki.mosquitto_files import BrokerConfigSpec, mosquitto_conf_text
    from edge_agent.files import atomic_write

    spec = BrokerConfigSpec(
        auth=args.auth,
        cafile=store.ca_cert.resolve(),
        certfile=store.server_cert.resolve(),
        keyfile=store.server_key.resolve(),
        crlfile=store.crl.resolve() if args.auth == "certificate" else None,
        acl_file=args.acl_file.resolve(),
        password_file=args.password_file.resolve() if args.password_file is not None else None,
        persistence_location=args.persistence_location,
        port=args.port,
        bind=args.bind,
        run_as_user=args.run_as_user,
        log_dest=args.log_dest,
    )
    atomic_write(args.out, mosquitto_conf_text(spec).encode())
    print(f"mosquitto.conf ({args.auth}) written to {args.out}")
    return 0


def _token(store: PkiStore, args: argparse.Namespace) -> int:
    from broker_server.pki.tokens import parse_ttl

    store.authority()  # no CA, no enrollment: say so now
    token = store.issue_token(args.device_id, parse_ttl(args.ttl))
    print(token)
    return 0


def _enroll_server(store: PkiStore, args: argparse.Namespace) -> int:
    from broker_server.pki.enroll_server import EnrollmentConfig, EnrollmentServer
    from broker_server.pki.rate_limit import RateLimits

    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {args.listen!r}: expected HOST:PORT")
    store.authority()
    limits = RateLimits(
        client_rate=args.client_rate,
        client_burst=args.client_burst,
        global_rate=args.global_rate,
        global_burst=args.global_burst,
        failure_cost=args.failed_token_cost,
    )
    config = EnrollmentConfig(
        host=host,
        port=int(port),
        certfile=store.server_cert,
        keyfile=store.server_key,
        cert_days=args.cert_days,
        password_file=args.password_file,
        mqtt_url=args.mqtt_url,
        limits=limits,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EnrollmentServer(store, config, on_change=lambda: _reload_mosquitto(args)) as server:
        print(f"enrollment endpoint at {server.url}", flush=True)
        stop.wait()
    return 0


def _list(store: PkiStore, args: argparse.Namespace) -> int:
    for record in store.records():
        state = f"revoked {record.revoked_at}" if record.revoked_at else "valid"
        print(f"{record.kind:8} {record.name:40} serial {record.serial} until {record.not_after} {state}")
    for digest, token in store.tokens().records().items():
        used = f"used {token.used_at}" if token.used_at else "unused"
        print(f"token    {token.device_id:40} sha256 {digest[:12]}… until {token.expires_at} {used}")
    return 0


def _signing_key(store: PkiStore, args: argparse.Namespace) -> int:
    from edge_agent.crypto.signing import SigningKey, write_key_pair
    from edge_agent.protocol.topics import validate_device_id

    name = validate_device_id(args.name)  # a plain file name
    private, public = store.root / "signing" / f"{name}.key", store.root / "signing" / f"{name}.pub"
    key = SigningKey.generate()
    write_key_pair(key, private, public, overwrite=args.force)
    print(f"{private} (0600: give it to the server's [ota] signing_key or `pki sign-bundle --key`)")
    print(f"{public}: add to each device's [ota] trusted_keys:\n{key.public_key.hex()}  (key id {key.key_id})")
    return 0


def _sign_bundle(store: PkiStore, args: argparse.Namespace) -> int:
    from edge_agent.crypto.signing import SigningKey, sign_bundle

    key = SigningKey.load(args.key, source="--key")
    path = sign_bundle(args.bundle, key)
    print(f"{path} written: bundle signed by key {key.key_id}")
    return 0


def _reload_mosquitto(args: argparse.Namespace) -> None:
    """SIGHUP Mosquitto (``--reload-pid`` or the pid in ``--reload-pid-file``), if one is given."""
    if args.reload_pid_file is not None:
        _signal_reload(_mosquitto_pid(args.reload_pid_file))
    else:
        _signal_reload(args.reload_pid)


def _mosquitto_pid(path: Path) -> int:
    """The pid in a pid file, checked (where /proc exists) to be a running Mosquitto: a stale file
    after a crash may name an unrelated process, which SIGHUP would usually terminate."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--reload-pid-file {path}: cannot read it: {exc}") from exc
    if not text.isdigit() or int(text) < 2:
        raise ConfigError(f"--reload-pid-file {path}: {text[:20]!r} is not a process id")
    pid = int(text)
    proc = Path("/proc")
    if proc.is_dir():
        try:
            name = (proc / str(pid) / "comm").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            raise ConfigError(f"--reload-pid-file {path}: no process {pid} (Mosquitto not running?)") from None
        if name != "mosquitto":
            raise ConfigError(f"--reload-pid-file {path}: process {pid} is {name!r}, not mosquitto: stale pid file?")
    return pid


def _signal_reload(pid: int | None) -> None:
    """SIGHUP Mosquitto: it re-reads the password file, the ACL and the CRL (verified with 2.0.11)."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ConfigError(f"--reload-pid {pid}: cannot signal it: {exc.strerror or exc}") from exc
    print(f"sent SIGHUP to {pid}")


_HANDLERS: dict[str, Callable[..., int]] = {
    "init": _init,
    "server-cert": _server_cert,
    "device-cert": _device_cert,
    "service-cert": _service_cert,
    "revoke": _revoke,
    "crl": _crl,
    "passwd": _passwd,
    "acl": _acl,
    "mosquitto-config": _mosquitto_config,
    "token": _token,
    "enroll-server": _enroll_server,
    "list": _list,
    "signing-key": _signing_key,
    "sign-bundle": _sign_bundle,
}
