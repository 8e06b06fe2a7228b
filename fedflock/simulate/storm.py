"""The reconnect-storm drill: restart Mosquitto under a connected fleet, measure the comeback.

The fleet is the simulator's (worker processes of real agents on hub transports, idle: the
``gateways`` mix never declines and nothing trains). The drill stops Mosquitto (SIGTERM; it
saves its persistence file), starts it again on the same port with the same persistence, and
reads every worker's connection event log: the successful reconnects (CONNACKs) and reconnect
attempts per second, and the time until 99 % of the fleet was connected again. Run once per
jitter mode (``benchmarks/fleet.py``) to compare full jitter against none.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.transport.backoff import ReconnectSettings
from fedflock.simulate.pool import SimulationError, WorkerPool
from fedflock.simulate.run import SimulateConfig, start_messages

__all__ = ["StormResult", "peak_rate", "run_storm", "time_to_fraction"]


def peak_rate(times: Sequence[float], bucket_s: float) -> float:
    """The largest count of ``times`` in one ``bucket_s`` bucket, per second."""
    if not times:
        return 0.0
    counts = Counter(math.floor(t / bucket_s) for t in times)
    return max(counts.values()) / bucket_s


def time_to_fraction(times: Sequence[float], start: float, total: int, fraction: float) -> float | None:
    """Seconds from ``start`` until ``fraction`` of ``total`` devices had (re)connected; ``None`` if never."""
    needed = math.ceil(total * fraction)
    ordered = sorted(t for t in times if t >= start)
    return ordered[needed - 1] - start if needed <= len(ordered) else None


@dataclass(frozen=True)
class StormResult:
    devices: int
    jitter: str
    min_s: float
    broker_down_s: float
    reconnected: int
    time_to_99_s: float | None
    peak_connects_per_s: float
    peak_attempts_per_s: float
    bucket_s: float
    connects: list[float]

    def as_row(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "connects"}


def run_storm(
    workdir: Path,
    *,
    bundle: Path,
    devices: int,
    processes: int,
    reconnect: ReconnectSettings,
    timeout_s: float = 120.0,
    bucket_s: float = 0.25,
    seed: int = 0,
) -> StormResult:
    """Connect ``devices`` idle devices, restart the broker, wait until all are back (or timeout)."""
    from broker_server.mosquitto_process import MosquittoProcess

    store = workdir / "persistence"
    store.mkdir(parents=True, exist_ok=True)
    broker = MosquittoProcess(
        workdir / "mosquitto",
        extra_config=("persistence true", f"persistence_location {store}/", "max_connections -1"),
    )
    config = SimulateConfig(
        devices=devices,
        per_round=1,
        processes=processes,
        profile="gateways",
        seed=seed,
        tick_s=10.0,
        threads=2,
        examples=(8, 8),
        reconnect=reconnect,
        out_dir=workdir,
    )
    broker.start()
    pool = WorkerPool(processes, workdir / "workers")
    try:
        pool.spawn()
        from edge_agent.runtime.bundle import Bundle

        ready = pool.request(start_messages(config, broker.url, Bundle.open(bundle), time.time()))
        connected = sum(r["connected"] for r in ready)
        if connected != devices:
            raise SimulationError(f"only {connected}/{devices} devices connected before the storm")
        restart = time.time()
        broker.stop()
        broker.start()
        down = time.time() - restart
        deadline = time.monotonic() + timeout_s
        while sum(s["connected"] for s in pool.request({"cmd": "stats"})) < devices and time.monotonic() < deadline:
            time.sleep(0.2)
        events = pool.request({"cmd": "events", "since": restart})
    finally:
        pool.stop()
        broker.stop()
    connects = sorted(t for e in events for t in e["connect"])
    attempts = [t for e in events for t in e["attempt"]]
    return StormResult(
        devices=devices,
        jitter=reconnect.jitter,
        min_s=reconnect.min_s,
        broker_down_s=down,
        reconnected=len(connects),
        time_to_99_s=time_to_fraction(connects, restart, devices, 0.99),
        peak_connects_per_s=peak_rate(connects, bucket_s),
        peak_attempts_per_s=peak_rate(attempts, bucket_s),
        bucket_s=bucket_s,
        connects=[t - restart for t in connects],
    )
