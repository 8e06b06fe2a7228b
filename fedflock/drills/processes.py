"""Real processes for the drills: ``fedflock agent`` and ``fedflock broker`` subprocesses, and
the read-only views of their on-disk state the drills check.

Mosquitto itself is :class:`broker_server.mosquitto_process.MosquittoProcess` (with
``persistence_dir=`` for the persistence drill; :meth:`~MosquittoProcess.kill` SIGKILLs it and
:meth:`~MosquittoProcess.start` brings it back on the same port).

A SIGKILL drill must kill the real thing: every process here is a ``python -m fedflock ...``
child with its own state directory or store file, and :meth:`FedflockProcess.kill` sends
SIGKILL. Output goes to a log file (appended across restarts, so one file tells the whole
story).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import StorageError

__all__ = [
    "PERMISSIVE_POLICY",
    "AgentSpec",
    "FedflockProcess",
    "OutboxRow",
    "outbox_rows",
    "wait_for",
    "write_agent_config",
]

REPO = Path(__file__).resolve().parents[2]

#: Every eligibility check passes on any Linux machine (a CI runner may have no sensors).
PERMISSIVE_POLICY = """
[policy]
min_free_memory_mb = 0
min_free_disk_mb = 0
max_temperature_c = 150
unmetered_for = []
require_network_for = []

[policy.unknown]
charging = "allow"
memory = "allow"
"""


def wait_for(condition: Callable[[], bool], timeout: float, what: str, *, poll_s: float = 0.05) -> float:
    """Poll ``condition`` until it holds; the seconds it took. AssertionError naming ``what`` on timeout."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - began


@dataclass(frozen=True, kw_only=True)
class AgentSpec:
    """What an ``agent.toml`` of a drill device says."""

    device_id: str
    state_dir: Path
    bundle: Path
    data: Path
    mqtt_url: str
    topic_prefix: str
    monitor_interval_s: float = 1.0


def write_agent_config(spec: AgentSpec, path: Path) -> Path:
    """Write ``spec`` as an agent.toml at ``path`` (permissive policy); returns ``path``."""
    path.write_text(
        f'device_id = "{spec.device_id}"\nstate_dir = "{spec.state_dir}"\nbundle = "{spec.bundle}"\n\n'
        f'[mqtt]\nurl = "{spec.mqtt_url}"\ntopic_prefix = "{spec.topic_prefix}"\n\n'
        f'[data]\nkind = "npz"\npath = "{spec.data}"\n\n'
        f"[agent]\nmonitor_interval_s = {spec.monitor_interval_s}\n{PERMISSIVE_POLICY}",
        encoding="utf-8",
    )
    return path


class FedflockProcess:
    """``python -m fedflock <args>`` as a child process; start, SIGKILL, restart, read its log."""

    def __init__(self, args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.log = log
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self, *, env: Mapping[str, str] | None = None) -> None:
        """Start (again); ``env`` adds variables for this run only (e.g. a crash hook)."""
        if self.running:
            raise StorageError(f"fedflock {self.args[0]} already running (pid {self.pid})")
        environ = dict(os.environ, PYTHONPATH=str(REPO), **self._env, **(env or {}))
        with open(self.log, "ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "fedflock", *self.args],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL the process; its exit code (``-9``)."""
        process = self._require()
        process.send_signal(signal.SIGKILL)
        self.kills += 1
        return process.wait(timeout)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait (SIGKILL if it does not exit in time); the exit code."""
        process = self._require()
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; its exit code."""
        return self._require().wait(timeout)

    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def close(self) -> None:
        """Kill it if still running (test teardown)."""
        if self.running:
            assert self._process is not None
            self._process.kill()
            self._process.wait(10)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _require(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise StorageError(f"fedflock {self.args[0]} was never started")
        return self._process


@dataclass(frozen=True)
class OutboxRow:
    task_id: str
    attempts: int
    delivered_at: float | None


def outbox_rows(state_dir: Path) -> list[OutboxRow]:
    """The agent's outbox, read-only (safe while the agent runs; [] before it made its store)."""
    path = state_dir / "agent.db"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT task_id, attempts, delivered_at FROM results ORDER BY seq").fetchall()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the outbox in {path}: {exc}") from exc
    return [OutboxRow(str(r[0]), int(r[1]), r[2]) for r in rows]
