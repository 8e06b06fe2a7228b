"""``fedflock demo``: the whole system on one machine, on real parts.

An MQTT broker (embedded amqtt unless ``--mqtt-url`` names one), a bundle exported from a small
PyTorch CNN, scikit-learn's digits split non-IID across N device agents (each a real
:class:`~edge_agent.agent.Agent` with its own MQTT connection and onnxruntime sessions, run as
threads), and the FedAvg server. Writes metrics (CSV, JSON), a PNG plot and every model version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from broker_server.server import FederatedServer, RoundResult, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from fedflock.datasets import dirichlet_partition, load_digits_arrays, train_test_split
from fedflock.report import write_metrics
from fedflock.wiring import device_transport, server_transport

log = logging.getLogger("fedflock.demo")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    devices: int = 20
    per_round: int = 10
    rounds: int = 20
    alpha: float = 0.5
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    test_fraction: float = 0.2
    mqtt_url: str | None = None
    out_dir: Path = Path("fedflock-demo")
    topics: Topics = Topics()
    seed: int = 0
    round_timeout_s: float = 60.0
    progress: bool = True


@dataclass(frozen=True)
class DemoReport:
    results: list[RoundResult]
    wall_s: float
    out_dir: Path

    @property
    def final_accuracy(self) -> float | None:
        done = [r.test_accuracy for r in self.results if r.test_accuracy is not None]
        return done[-1] if done else None


@contextlib.contextmanager
def _broker(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from broker_server.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


def export_demo_bundle(out_dir: Path, *, lr: float) -> Bundle:
    from model_export.exporter import export_bundle  # needs torch: the `export` extra
    from model_export.models import digits_cnn

    path = export_bundle(digits_cnn(10), input_shape=(1, 8, 8), num_classes=10, out_dir=out_dir, lr=lr)
    return Bundle.open(path)


def run_demo(config: DemoConfig) -> DemoReport:
    started = time.monotonic()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    x, y = load_digits_arrays()
    train_idx, test_idx = train_test_split(y, config.test_fraction, rng)
    parts = dirichlet_partition(y[train_idx], config.devices, config.alpha, rng, min_size=8)
    log.info("exporting the demo CNN to %s", out / "bundle")
    bundle = export_demo_bundle(out / "bundle", lr=config.lr)
    device_files = _write_device_data(out / "devices", x[train_idx], y[train_idx], parts)
    evaluator = OrtTrainer.open(bundle, threads=2)
    test = Dataset(x[test_idx], y[test_idx])
    with _broker(config.mqtt_url) as url:
        stop = threading.Event()
        agents, threads = _start_agents(url, bundle, device_files, config, stop)
        server = FederatedServer(
            server_transport(url, f"fedflock-server-{rng.integers(1 << 30)}"),
            bundle,
            ServerConfig(
                rounds=config.rounds,
                clients_per_round=config.per_round,
                min_clients=config.devices,
                wait_for_clients_s=60.0,
                round_timeout_s=config.round_timeout_s,
                local_epochs=config.local_epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=config.seed,
                topics=config.topics,
            ),
            out_dir=out,
            evaluator=lambda w: evaluator.evaluate(w, test.x, test.y),
        )
        try:
            server.start()
            results = _run_with_progress(server, config)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            for agent in agents:
                agent.close()
            server.close()
    report = DemoReport(results, time.monotonic() - started, out)
    write_metrics(out, results, baseline=server.baseline)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path | Topics) else v for k, v in asdict(config).items()},
                "wall_s": report.wall_s,
                "final_test_accuracy": report.final_accuracy,
                "train_examples": len(train_idx),
                "test_examples": len(test_idx),
                "device_examples": [len(p) for p in parts],
            },
            indent=2,
        )
    )
    return report


def _write_device_data(directory: Path, x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for number, idx in enumerate(parts):
        path = directory / f"device-{number:03d}.npz"
        np.savez(path, x=x[idx], y=y[idx])
        files.append(path)
    return files


def _start_agents(
    url: str, bundle: Bundle, files: list[Path], config: DemoConfig, stop: threading.Event
) -> tuple[list[Agent], list[threading.Thread]]:
    from edge_agent.data import load_npz

    agents, threads = [], []
    for number, path in enumerate(files):
        device_id, data = f"device-{number:03d}", load_npz(path)
        agent = Agent(
            AgentConfig(device_id=device_id, topics=config.topics, seed=config.seed + number),
            device_transport(url, device_id, bundle_digest=bundle.digest, num_examples=len(data), topics=config.topics),
            OrtTrainer.open(bundle, threads=1),
            data,
        )
        agent.start()
        thread = threading.Thread(target=agent.run, args=(stop,), name=device_id, daemon=True)
        thread.start()
        agents.append(agent)
        threads.append(thread)
    return agents, threads


def _run_with_progress(server: FederatedServer, config: DemoConfig) -> list[RoundResult]:
    from tqdm import tqdm

    with tqdm(total=config.rounds, desc="rounds", unit="round", disable=not config.progress) as bar:

        def on_round(result: RoundResult) -> None:
            acc = "-" if result.test_accuracy is None else f"{result.test_accuracy:.3f}"
            bar.update(1)
            bar.set_postfix(test_acc=acc, updates=f"{result.reported}/{result.selected}")
            bar.write(
                f"round {result.round:3d}  test accuracy {acc}  updates {result.reported}/{result.selected}"
                f"  {result.duration_s:.1f}s"
            )

        return server.run(on_round)
