"""Run Mosquitto with a configuration file as it is (e.g. one ``fedflock pki mosquitto-config`` wrote).

``MosquittoProcess`` (``broker_server/mosquitto_process.py``) writes its own test configuration;
this runs a given one, so tests prove that the generated file works, and can :meth:`reload` it
(SIGHUP: Mosquitto 2 re-reads the password file, the ACL and the CRL)::

    with ConfiguredMosquitto(conf, host="127.0.0.1", port=8883) as broker:
        ...
        broker.reload()
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from broker_server.mosquitto_process import find_mosquitto, wait_for_port
from edge_agent.errors import TransportError

__all__ = ["ConfiguredMosquitto"]

RELOAD_SETTLE_S = 0.3  # Mosquitto handles the signal at its next loop iteration


class ConfiguredMosquitto:
    def __init__(self, config: Path, *, host: str, port: int, start_timeout: float = 10.0) -> None:
        self.config, self.host, self.port = config, host, port
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise TransportError("mosquitto is not running")
        return self._process.pid

    @property
    def stderr_path(self) -> Path:
        """Mosquitto's stderr (config errors before logging starts, and ``log_dest stderr``)."""
        return self.config.with_name(self.config.name + ".stderr")

    def start(self) -> None:
        with self.stderr_path.open("wb") as stderr:  # a file, not a pipe: a chatty broker never blocks on it
            self._process = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.config)], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        if not wait_for_port(self.host, self.port, self._start_timeout) or self._process.poll() is not None:
            output = self._stop_and_read()
            raise TransportError(f"mosquitto -c {self.config} did not start on {self.host}:{self.port}: {output}")

    def reload(self) -> None:
        """SIGHUP, then a moment for Mosquitto to act on it."""
        if self._process is None or self._process.poll() is not None:
            raise TransportError("mosquitto is not running")
        self._process.send_signal(signal.SIGHUP)
        time.sleep(RELOAD_SETTLE_S)

    def stop(self) -> None:
        self._stop_and_read()

    def _stop_and_read(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5.0)
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError as exc:
            return f"(stderr unreadable: {exc})"

    def __enter__(self) -> ConfiguredMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
