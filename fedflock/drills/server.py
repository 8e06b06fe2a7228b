"""An in-process federation server for drills whose fault is not the server itself.

:class:`DrillServer` is a real :class:`~broker_server.server.FederatedServer` on a real MQTT
transport with a real SQLite store (the store is what the exactly-once verdict reads). Rounds
run on a background thread, one at a time, so a drill can fault the world around a round and
then wait for it: ``server.start_round(1)`` ... ``server.finish_round(timeout)``.

The drills that kill the server use the ``fedflock broker`` command instead
(:class:`fedflock.drills.processes.FedflockProcess`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from broker_server.persistence import SqliteServerStore
from broker_server.server import FederatedServer, ServerConfig
from broker_server.server_config import RoundResult
from edge_agent.errors import FedflockError
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from fedflock.drills.report import RoundLedger, read_ledger

__all__ = ["DrillServer", "LogCounter"]


def drill_config(*, devices: int, rounds: int, prefix: str, round_timeout_s: float = 90) -> ServerConfig:
    """The drills' server: every device in every round, all must report, fp32 updates."""
    return ServerConfig(
        rounds=rounds,
        clients_per_round=devices,
        min_clients=devices,
        min_reports=devices,
        round_timeout_s=round_timeout_s,
        wait_for_clients_s=60,
        local_epochs=1,
        batch_size=8,
        codecs=("fp32",),
        topics=Topics(prefix),
    )


class LogCounter(logging.Handler):
    """Counts log records on the server's logger whose message contains one of ``needles``."""

    def __init__(self, *needles: str) -> None:
        super().__init__(logging.INFO)
        self.needles = needles
        self.counts = dict.fromkeys(needles, 0)
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        with self._lock2:
            for needle in self.needles:
                if needle in text:
                    self.counts[needle] += 1


class DrillServer:
    """A FederatedServer with a SQLite store at ``db``; rounds on a background thread."""

    def __init__(self, host: str, port: int, bundle: Bundle, config: ServerConfig, db: Path, *, client_id: str) -> None:
        self.config = config
        self.db = db
        self._transport = MqttTransport(
            MqttConfig(host=host, port=port, client_id=client_id, reconnect_min_delay=0.2, reconnect_max_delay=1.0)
        )
        self._bundle = bundle
        self._store: SqliteServerStore | None = None
        self.server: FederatedServer | None = None
        self._thread: threading.Thread | None = None
        self._result: RoundResult | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._store = SqliteServerStore.open(self.db)
        self.server = FederatedServer(self._transport, self._bundle, self.config, store=self._store)
        self.server.start()

    def start_round(self, number: int) -> None:
        """Run round ``number`` (waiting for devices first) on a background thread."""
        server = self._require()
        if self._thread is not None and self._thread.is_alive():
            raise FedflockError("a drill round is still running")
        self._result, self._error = None, None

        def run() -> None:
            try:
                self._result = server.run_round(number)
            except BaseException as exc:  # handed to finish_round, which re-raises it in the test
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"drill-round-{number}", daemon=True)
        self._thread.start()

    def finish_round(self, timeout: float) -> RoundResult:
        """Wait for the round started last; its result (re-raises what the round raised)."""
        thread = self._thread
        if thread is None:
            raise FedflockError("no drill round was started")
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"round still running after {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def ledger(self, rounds: Iterable[int]) -> list[RoundLedger]:
        """The store's ledger of ``rounds``, read through a second connection."""
        store = SqliteServerStore.open(self.db)
        try:
            return read_ledger(store, rounds)
        finally:
            store.close()

    def accepted(self, number: int) -> int:
        """Updates committed for round ``number`` so far (0 before the round is stored)."""
        store = SqliteServerStore.open(self.db)
        try:
            if (store.last_round() or 0) < number:
                return 0
            return len(store.load_round(number).accepted)
        finally:
            store.close()

    def has_accepted(self, number: int, count: int = 1) -> bool:
        """True once round ``number`` has at least ``count`` committed updates."""
        return self.accepted(number) >= count

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._store is not None:
            self._store.close()

    def _require(self) -> FederatedServer:
        if self.server is None:
            raise FedflockError("drill server not started")
        return self.server
