"""The coordinator's side of the worker processes: spawn, JSON lines over pipes, stop.

Each worker is ``python -m fedflock.simulate.worker`` (a subprocess, so nothing is pickled): the
coordinator writes commands as JSON lines to its stdin and reads one JSON line answer each from
its stdout; a worker's log (stderr) goes to ``<out>/workers/worker-<k>.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from edge_agent.errors import FedflockError

__all__ = ["SimulationError", "WorkerPool"]


class SimulationError(FedflockError):
    code = "simulation_failed"


class WorkerPool:
    """``count`` worker processes; :meth:`request` sends one command to all and collects the answers."""

    def __init__(self, count: int, log_dir: Path, *, timeout_s: float = 300.0) -> None:
        self._count = count
        self._log_dir = log_dir
        self._timeout = timeout_s
        self._procs: list[subprocess.Popen[str]] = []
        self._logs: list[IO[bytes]] = []
        self._lock = threading.Lock()

    def spawn(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        for number in range(self._count):
            log = open(self._log_dir / f"worker-{number}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedflock.simulate.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                bufsize=1,
            )
            self._procs.append(proc)

    def request(self, messages: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
        """Send one message to every worker (a list: one each) and return their answers in order."""
        each = messages if isinstance(messages, list) else [messages] * self._count
        with self._lock:
            for proc, message in zip(self._procs, each, strict=True):
                self._write(proc, message)
            answers = [self._read(number, proc) for number, proc in enumerate(self._procs)]
        for number, answer in enumerate(answers):
            if answer.get("event") == "error":
                raise SimulationError(f"worker {number}: {answer.get('reason')}")
        return answers

    def _write(self, proc: subprocess.Popen[str], message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SimulationError(f"worker {proc.pid} is gone ({exc}); see its log in {self._log_dir}") from exc

    def _read(self, number: int, proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            tail = self.log_tail(number)
            raise SimulationError(f"worker {number} exited with {proc.returncode}; its log ends:\n{tail}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SimulationError(f"worker {number} sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise SimulationError(f"worker {number} sent {answer!r}, not an object")
        return answer

    def log_tail(self, number: int, lines: int = 20) -> str:
        try:
            text = (self._log_dir / f"worker-{number}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Ask every worker to close its devices and exit; kill those that do not."""
        answers: list[dict[str, Any]] = []
        try:
            if self._procs and all(p.poll() is None for p in self._procs):
                answers = self.request({"cmd": "stop"})
        finally:
            for proc in self._procs:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            for log in self._logs:
                log.close()
            self._procs, self._logs = [], []
        return answers

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]
