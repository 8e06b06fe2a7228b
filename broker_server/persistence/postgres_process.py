"""Run a throw-away PostgreSQL server as a subprocess: for tests, benchmarks and local development.

Usage::

    with PostgresProcess() as pg:
        store = PostgresServerStore.open(pg.conninfo("postgres"))

``initdb`` makes a fresh cluster in a private directory (trust authentication, no TCP: the server
listens only on a Unix socket in that directory), ``postgres`` runs it in the foreground as our
child, and :meth:`stop` shuts it down and deletes the directory. Durability is switched off
(``fsync=off``): the data is thrown away anyway. The binaries are Debian's
(``/usr/lib/postgresql/<major>/bin``) or whatever ``initdb``/``postgres`` is on ``PATH``.

PostgreSQL refuses to run as root. Started as root, both programs run as ``run_as`` (default
``nobody``) through ``setpriv``, and the directory is created in the system temp directory and
given to that user (a pytest ``tmp_path`` is private to root, so it cannot be used).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from broker_server.mosquitto_process import free_port
from edge_agent.errors import ConfigError, StorageError

__all__ = ["PostgresNotInstalled", "PostgresProcess", "find_postgres_bin"]


_INITDB_ARGS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions")


class PostgresNotInstalled(ConfigError):
    code = "postgres_not_installed"


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (newest Debian major version first)."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("postgres") is not None:
        return Path(os.path.realpath(on_path)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True):
        if os.access(Path(candidate) / "initdb", os.X_OK):
            return Path(candidate)
    raise PostgresNotInstalled(
        "PostgreSQL server binaries not found (initdb/postgres on PATH or in /usr/lib/postgresql/*/bin); "
        "install Debian's `postgresql` package"
    )


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


class PostgresProcess:
    """One PostgreSQL server on a Unix socket in a private directory."""

    def __init__(self, *, run_as: str = "nobody", start_timeout: float = 30.0) -> None:
        """``run_as``: the user to run as when started as root (ignored otherwise)."""
        self.port = free_port()
        self._run_as = run_as
        self._start_timeout = start_timeout
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_dir(self) -> Path:
        if self._dir is None:
            raise StorageError("PostgreSQL is not started")
        return self._dir

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    @property
    def log_path(self) -> Path:
        return self.socket_dir / "postgres.log"

    def start(self) -> None:
        bindir = find_postgres_bin()
        prefix, owner = self._identity()
        self._dir = Path(tempfile.mkdtemp(prefix="fedflock-pg-"))
        if owner is not None:
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
        data = self._dir / "data"
        try:
            subprocess.run(
                [*prefix, str(bindir / "initdb"), "-D", str(data), *_INITDB_ARGS],
                check=True,
                capture_output=True,
                timeout=self._start_timeout,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            output = getattr(exc, "stderr", b"") or b""
            self.stop()
            raise StorageError(f"initdb failed: {exc}\n{output.decode(errors='replace')}") from exc
        settings = ["listen_addresses=", "fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        settings += ["max_connections=50", "shared_buffers=16MB"]
        command = [*prefix, str(bindir / "postgres"), "-D", str(data), "-k", str(self._dir), "-p", str(self.port)]
        with open(self.log_path, "wb") as log:
            if owner is not None:
                os.chown(self.log_path, owner.pw_uid, owner.pw_gid)
            self._process = subprocess.Popen(
                command + [arg for setting in settings for arg in ("-c", setting)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not self._wait_ready(data / "postmaster.pid"):
            log_text = self.read_log()
            self.stop()
            raise StorageError(f"PostgreSQL did not become ready; log:\n{log_text}")

    def _identity(self) -> tuple[list[str], pwd.struct_passwd | None]:
        if os.geteuid() != 0:
            return [], None
        try:
            user = pwd.getpwnam(self._run_as)
        except KeyError as exc:
            raise ConfigError(f"PostgreSQL cannot run as root and user {self._run_as!r} does not exist") from exc
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ConfigError("running PostgreSQL from root needs `setpriv` (util-linux) to drop privileges")
        # setpriv execs (no fork), so our child is the postmaster itself and signals reach it
        ids = ["--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--clear-groups"]
        return [setpriv, *ids], user

    def _wait_ready(self, pidfile: Path) -> bool:
        # postmaster.pid's 8th line turns to "ready" once connections are accepted (PostgreSQL >= 10)
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL after ``timeout``; then delete the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, StorageError):
            return "(no log written)"

    def __enter__(self) -> PostgresProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
