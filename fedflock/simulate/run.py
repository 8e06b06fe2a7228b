"""``fedflock simulate``: a fleet of simulated devices (real agents) against the real server.

The coordinator (this process) starts or reaches the broker, draws the fleet (profiles, data),
spawns ``processes`` workers (``worker.py``) that host the devices, runs the
:class:`~broker_server.server.FederatedServer` and, after every round, asks the workers for
their counters to report connected / eligible by reason / selected / reported / dropped /
bytes / accuracy / round time (``report.py``). docs/simulator.md is the guide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.backoff import ReconnectSettings
from edge_agent.transport.mqtt_config import parse_mqtt_url
from fedflock.simulate.data import fleet_data, save_digits
from fedflock.simulate.mixes import draw_fleet, load_mix
from fedflock.simulate.pool import WorkerPool
from fedflock.simulate.report import Progress, RoundRow, decline_reasons, dropouts_in, write_outputs

__all__ = ["SimulateConfig", "SimulationReport", "broker_for", "run_simulation"]

log = logging.getLogger("fedflock.simulate")


@dataclass(frozen=True, kw_only=True)
class SimulateConfig:
    devices: int = 100
    per_round: int = 10
    rounds: int = 5
    profile: str = "mixed"
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    mqtt_url: str | None = None
    #: without mqtt_url: "mosquitto" (a private one in out_dir) or "embedded" (amqtt, small fleets)
    broker: str = "mosquitto"
    bundle: Path | None = None
    out_dir: Path = Path("fedflock-sim")
    #: simulated seconds per real second (60: a simulated day in 24 real minutes)
    time_scale: float = 60.0
    start_hour: float = 8.0
    #: every device's agent is ticked this often (real seconds): upload retries, eligibility
    tick_s: float = 2.0
    threads: int = 8
    slots: int = 1
    examples: tuple[int, int] = (32, 96)
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    round_timeout_s: float = 60.0
    over_selection: float = 1.2
    reconnect: ReconnectSettings = field(default_factory=ReconnectSettings)
    topics: Topics = Topics()
    progress: bool = True
    #: how long to wait for the server to have seen every connected device's STATUS
    settle_s: float = 30.0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.processes < 1 or self.rounds < 1:
            raise ConfigError("--devices, --processes and --rounds must be >= 1")
        if not 1 <= self.per_round <= self.devices:
            raise ConfigError(f"--per-round must be between 1 and --devices ({self.devices}), got {self.per_round}")
        if self.broker not in ("mosquitto", "embedded"):
            raise ConfigError(f"--broker must be 'mosquitto' or 'embedded', got {self.broker!r}")
        if self.tick_s <= 0 or self.threads < 1 or self.slots < 1:
            raise ConfigError("--tick-s must be > 0, --threads and --slots >= 1")
        if self.mqtt_url is not None:
            parse_mqtt_url(self.mqtt_url)  # ConfigError naming the url
        load_mix(self.profile)  # ConfigError naming the mix key


@dataclass(frozen=True)
class SimulationReport:
    rows: list[RoundRow]
    summary: dict[str, Any]
    outputs: dict[str, Path]


@contextlib.contextmanager
def broker_for(config: SimulateConfig) -> Iterator[str]:
    """The broker's url: ``mqtt_url``, or a private Mosquitto / embedded amqtt for the run."""
    if config.mqtt_url is not None:
        yield config.mqtt_url
        return
    if config.broker == "embedded":
        from broker_server.embedded_broker import EmbeddedBroker

        with EmbeddedBroker() as embedded:
            yield embedded.url
        return
    from broker_server.mosquitto_process import MosquittoProcess

    with MosquittoProcess(config.out_dir / "mosquitto") as mosquitto:
        yield mosquitto.url


def _bundle(config: SimulateConfig) -> Bundle:
    if config.bundle is not None:
        return Bundle.open(config.bundle)
    from fedflock.demo import export_demo_bundle  # torch: the `export` extra

    return export_demo_bundle(config.out_dir / "bundle", lr=config.lr)


def start_messages(config: SimulateConfig, url: str, bundle: Bundle, epoch: float) -> list[dict[str, Any]]:
    """One worker start message each: device ``i`` lives in worker ``i % processes``."""
    host, port = parse_mqtt_url(url)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    digits = save_digits(config.out_dir / "digits.npz")
    return [
        {
            "cmd": "start",
            "worker": k,
            "indices": list(range(k, config.devices, config.processes)),
            "mix": config.profile,
            "devices": config.devices,
            "seed": config.seed,
            "examples": list(config.examples),
            "host": host,
            "port": port,
            "topic_prefix": config.topics.prefix,
            "bundle": str(bundle.directory.resolve()),
            "time_scale": config.time_scale,
            "start_hour": config.start_hour,
            "epoch": epoch,
            "tick_s": config.tick_s,
            "threads": config.threads,
            "slots": config.slots,
            "reconnect": config.reconnect.config_fields(),
            "digits": str(digits.resolve()),
        }
        for k in range(config.processes)
    ]


def run_simulation(config: SimulateConfig) -> SimulationReport:
    """Run the whole simulation; raises :class:`SimulationError` if a worker fails."""
    from broker_server.server import FederatedServer, ServerConfig
    from edge_agent.runtime.trainer import OrtTrainer
    from fedflock.wiring import server_transport

    started = time.monotonic()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    mix = load_mix(config.profile)
    fleet = draw_fleet(mix, config.devices, config.seed)
    _, test = fleet_data(config.devices, mix.alpha, config.seed, config.examples)
    bundle = _bundle(config)
    evaluator = OrtTrainer.open(bundle, threads=1)
    progress = Progress(enabled=config.progress)
    with broker_for(config) as url:
        pool = WorkerPool(config.processes, out / "workers")
        pool.spawn()
        try:
            ready = pool.request(start_messages(config, url, bundle, time.time()))
            connected = sum(r["connected"] for r in ready)
            progress.line(f"{connected}/{config.devices} devices connected in {max(r['start_s'] for r in ready):.1f}s")
            server = FederatedServer(
                server_transport(url, f"fedflock-sim-server-{config.seed}"),
                bundle,
                ServerConfig(
                    rounds=config.rounds,
                    clients_per_round=config.per_round,
                    min_clients=config.per_round,
                    wait_for_clients_s=config.round_timeout_s,
                    round_timeout_s=config.round_timeout_s,
                    local_epochs=config.local_epochs,
                    batch_size=config.batch_size,
                    lr=config.lr,
                    seed=config.seed,
                    topics=config.topics,
                    over_selection=config.over_selection,
                ),
                out_dir=out,
                evaluator=lambda w: evaluator.evaluate(w, test.x, test.y),
            )
            rows = _run_rounds(server, pool, config, connected, progress)
            final = pool.stop()
        finally:
            pool.stop()  # after an error: stop and reap the workers (a no-op once stopped)
    summary = _summary(config, mix.name, fleet, rows, final, time.monotonic() - started)
    outputs = write_outputs(out, rows, summary)
    return SimulationReport(rows, summary, outputs)


def _run_rounds(
    server: Any, pool: WorkerPool, config: SimulateConfig, connected: int, progress: Progress
) -> list[RoundRow]:
    server.start()
    deadline = time.monotonic() + config.settle_s
    while len(server.registry) < connected and time.monotonic() < deadline:
        server.serve(0.25)
    rows: list[RoundRow] = []
    last = {"at": time.time(), "up": 0, "down": 0}
    stop_live = threading.Event()

    def live() -> None:
        while not stop_live.wait(1.0):
            stats = pool.request({"cmd": "stats"})
            online = sum(s["connected"] for s in stats)
            progress.live(
                f"round {len(rows) + 1}: {time.time() - last['at']:.0f}s  connected {online}"
                f"  trained {sum(s['trained'] for s in stats)}  dropouts {sum(len(s['dropouts']) for s in stats)}"
            )

    def on_round(result: Any) -> None:
        stats = pool.request({"cmd": "stats"})
        now = time.time()
        up, down = sum(s["bytes_out"] for s in stats), sum(s["bytes_in"] for s in stats)
        records = server.registry.candidates(server.bundle.digest)
        row = RoundRow(
            round=result.round,
            completed=result.completed,
            connected=sum(s["connected"] for s in stats),
            eligible=len(server.registry.eligible(server.bundle.digest)),
            selected=result.selected,
            reported=result.reported,
            failed=result.failed,
            dropped=sum(dropouts_in(s["dropouts"], last["at"], now) for s in stats),
            bytes_up=up - last["up"],
            bytes_down=down - last["down"],
            test_accuracy=result.test_accuracy,
            duration_s=result.duration_s,
            declined=decline_reasons(r.eligibility for r in records),
            upload_blocked=_merge(s["upload_blocked"] for s in stats),
        )
        last.update(at=now, up=up, down=down)
        rows.append(row)
        progress.line(row.line())

    watcher = threading.Thread(target=live, name="sim-progress", daemon=True)
    if progress.is_live:
        watcher.start()
    try:
        server.run(on_round)
    finally:
        stop_live.set()
        if watcher.is_alive():
            watcher.join(5)
        server.close()
    return rows


def _merge(counts: Iterator[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def _summary(
    config: SimulateConfig, mix: str, fleet: list[Any], rows: list[RoundRow], final: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for device in fleet:
        kinds[device.profile_name] = kinds.get(device.profile_name, 0) + 1
    done = [r for r in rows if r.completed]
    settings = {k: str(v) if isinstance(v, Path | Topics) else v for k, v in asdict(config).items()}
    return {
        "config": settings,
        "mix": mix,
        "profiles": kinds,
        "wall_s": wall_s,
        "rounds_completed": len(done),
        "mean_round_s": sum(r.duration_s for r in done) / len(done) if done else None,
        "final_test_accuracy": done[-1].test_accuracy if done else None,
        "workers": [{k: v for k, v in s.items() if k not in ("dropouts", "upload_blocked")} for s in final],
    }
