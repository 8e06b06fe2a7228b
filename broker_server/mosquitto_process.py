"""Run a real Mosquitto broker as a subprocess: for integration tests, benchmarks and local development.

Usage::

    with MosquittoProcess(Path("/tmp/mq")) as broker:
        print(broker.url)   # mqtt://127.0.0.1:<free port>

The config is written from scratch (never the system ``/etc/mosquitto``): one loopback listener,
anonymous access (Mosquitto 2 refuses anonymous clients on configured listeners by default),
no persistence, logging to ``mosquitto.log`` in the work directory.

With ``persistence_dir=...`` Mosquitto saves its sessions, subscriptions, queued and retained
messages there every ``autosave_interval`` seconds and on a clean exit, and loads them when it
starts again (on the same port: :meth:`MosquittoProcess.start` after :meth:`kill` or
:meth:`stop`). A SIGKILL loses what changed since the last save: the fault drills
(``fedflock.drills``) kill it that way on purpose.

With ``tls=MosquittoTls(...)`` that listener speaks TLS only and :attr:`MosquittoProcess.url` is
``mqtts://``; connect with ``MqttConfig.from_url(broker.url, tls=TlsConfig(ca_file=...), ...)``::

    tls = MosquittoTls(cafile=ca, certfile=server_cert, keyfile=server_key, require_certificate=True)
    with MosquittoProcess(Path("/tmp/mq"), tls=tls) as broker:
        print(broker.url)   # mqtts://127.0.0.1:<free port>
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edge_agent.errors import ConfigError, TransportError

__all__ = [
    "MosquittoNotInstalled",
    "MosquittoProcess",
    "MosquittoTls",
    "find_mosquitto",
    "free_port",
    "wait_for_port",
]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"  # Debian installs it outside a normal user's PATH


class MosquittoNotInstalled(ConfigError):
    code = "mosquitto_not_installed"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until ``host:port`` accepts a TCP connection or ``timeout`` expires."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or (_FALLBACK_BINARY if os.access(_FALLBACK_BINARY, os.X_OK) else None)
    if found is None:
        raise MosquittoNotInstalled(
            "mosquitto binary not found (looked on PATH and at /usr/sbin/mosquitto). "
            "Integration tests need a real broker: `.ci/run` installs it (Debian package `mosquitto`)."
        )
    return found


@dataclass(frozen=True, kw_only=True)
class MosquittoTls:
    """TLS settings of the listener (PEM files; the key must not be encrypted).

    ``require_certificate``: clients must present a certificate signed by ``cafile``.
    ``use_identity_as_username``: the client certificate's Common Name becomes the MQTT username
    (so ACLs with ``%u`` apply to it); needs ``require_certificate``.
    """

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False

    def __post_init__(self) -> None:
        if self.use_identity_as_username and not self.require_certificate:
            raise ConfigError("use_identity_as_username needs require_certificate")

    def config_lines(self) -> list[str]:
        """The ``mosquitto.conf`` lines, to follow the ``listener`` line they apply to."""
        return [
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"require_certificate {_flag(self.require_certificate)}",
            f"use_identity_as_username {_flag(self.use_identity_as_username)}",
        ]


class MosquittoProcess:
    """One Mosquitto subprocess bound to ``host:port`` (a free port if none is given)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
        allow_anonymous: bool = True,
        extra_config: tuple[str, ...] = (),
        tls: MosquittoTls | None = None,
        persistence_dir: Path | None = None,
        autosave_interval: int = 1,
    ) -> None:
        """``extra_config``: more mosquitto.conf lines (e.g. ``acl_file ...``, ``max_packet_size 2048``).

        ``tls``: make the listener TLS-only (:attr:`url` becomes ``mqtts://``).
        ``persistence_dir``: turn persistence on, saving there every ``autosave_interval`` seconds.
        """
        if autosave_interval < 1:
            raise ConfigError(f"autosave_interval must be at least 1 second, got {autosave_interval}")
        self.workdir = workdir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._binary = binary
        self._start_timeout = start_timeout
        self._allow_anonymous = allow_anonymous
        self._extra_config = extra_config
        self.tls = tls
        self.persistence_dir = persistence_dir
        self._autosave_interval = autosave_interval
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port``, or ``mqtts://host:port`` with TLS."""
        return f"{'mqtts' if self.tls is not None else 'mqtt'}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def start(self) -> None:
        binary = self._binary or find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text())
        self._process = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_for_port(self.host, self.port, self._start_timeout) or self._process.poll() is not None:
            self.stop()
            raise TransportError(f"mosquitto did not start on {self.url}; log:\n{self.read_log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if Mosquitto has not exited within ``timeout``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self, timeout: float = 5.0) -> int:
        """SIGKILL Mosquitto (no save, no will messages sent by a clean shutdown); its pid."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            raise TransportError(f"mosquitto on {self.url} is not running")
        process.kill()
        process.wait(timeout)
        return process.pid

    @property
    def pid(self) -> int | None:
        """The running broker's process id, None when it is not running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log written)"

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _config_text(self) -> str:
        # Started as root, Mosquitto 2 drops to user `mosquitto`, which cannot write our log in a
        # private tmp dir; `user` set to ourselves keeps the current identity.
        user = pwd.getpwuid(os.getuid()).pw_name
        return "\n".join(
            [
                f"listener {self.port} {self.host}",
                *(self.tls.config_lines() if self.tls is not None else ()),
                f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
                *self._persistence_lines(),
                f"user {user}",
                f"log_dest file {self.log_path}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_type information",
                *self._extra_config,
                "",
            ]
        )

    def _persistence_lines(self) -> list[str]:
        if self.persistence_dir is None:
            return ["persistence false"]
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        return [
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            f"autosave_interval {self._autosave_interval}",
        ]


def _flag(value: bool) -> str:
    return "true" if value else "false"
