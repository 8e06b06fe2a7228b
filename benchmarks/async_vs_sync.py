"""Async FedBuff vs sync FedAvg: time-to-accuracy on digits when device speeds differ 10×, one script run.

Digits (scikit-learn's bundled copy) split over ``--devices`` (10) with Dirichlet(``--alpha``), the
same partition, initial weights and test set for both runs. Every device is a real
:class:`~edge_agent.agent.Agent` (onnxruntime training, codecs, uploads) in its own thread, and the
server is the real :class:`~broker_server.server.FederatedServer`, all over the in-memory
transport (no MQTT hop). Device ``i`` is slowed by an injected sleep of ``(f_i − 1) ×`` its real
training time after each task, with ``f_i`` spread evenly from 1 to ``--spread`` (10): the
algorithm is untouched, only the wall time a slow device takes.

* sync: FedAvg rounds over all ``--devices`` devices (``clients_per_round = devices``), so a round
  waits for the slowest device;
* async: FedBuff with ``buffer_size = --buffer`` (5), ``concurrency = devices``, staleness
  1/√(1+s), max staleness 8.

Reported: wall seconds from the first TASK until the global model first reaches each target test
accuracy (``--targets``, 0.85 0.90), for both, and sync/async (>1: async is faster). Each run
runs ``--rounds`` sync rounds, or ``rounds × devices / buffer`` async versions (the same number of updates).

    python benchmarks/async_vs_sync.py [--devices 10] [--spread 10] [--buffer 5] [--rounds 40]

Measured (2 shared, busy cores; ``--rounds 20``, otherwise the defaults; one seed, one run)::

    | target accuracy | sync FedAvg (s) | async FedBuff (s) | sync / async |
    |---|---|---|---|
    | 85% | 10.4 | 3.6 | 2.85x |
    | 90% | 14.0 | 4.8 | 2.90x |

Async accuracy is noisier from version to version (stale updates): a run with ``--rounds 10``
(20 async versions) did not reach 85 % in async mode at all, while sync reached it at 10.1 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compression import export_digits_bundle
from broker_server.server import FederatedServer, RoundResult, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.data import Dataset
from edge_agent.presence import offline_will
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer, TrainResult
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from fedflock.datasets import dirichlet_partition, load_digits_arrays, train_test_split


class SlowedTrainer(OrtTrainer):
    """OrtTrainer whose every training run is followed by ``(factor − 1) ×`` its duration of sleep."""

    factor: float = 1.0
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def train(self, *args: Any, **kwargs: Any) -> TrainResult:
        started = time.perf_counter()
        result = super().train(*args, **kwargs)
        self.sleep((self.factor - 1.0) * (time.perf_counter() - started))
        return result


@dataclass(frozen=True)
class Split:
    devices: list[Dataset]
    test: Dataset


def make_split(devices: int, alpha: float, seed: int) -> Split:
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    train, test = train_test_split(y, 0.2, rng)
    parts = dirichlet_partition(y[train], devices, alpha, rng)
    return Split([Dataset(x[train][p], y[train][p]) for p in parts], Dataset(x[test], y[test]))


def run_federation(
    bundle: Bundle, split: Split, config: ServerConfig, spread: float, targets: list[float]
) -> dict[float, float | None]:
    """Wall seconds (from the run's start) until each target accuracy, None if not reached."""
    broker = InMemoryBroker()
    stop = threading.Event()
    agents, threads = [], []
    n = len(split.devices)
    for i, data in enumerate(split.devices):
        device_id = f"dev-{i}"
        trainer = SlowedTrainer.open(bundle, threads=1)
        assert isinstance(trainer, SlowedTrainer)
        trainer.factor = 1.0 + (spread - 1.0) * i / max(n - 1, 1)
        transport = InMemoryTransport(broker, device_id, will=offline_will(device_id))
        agent = Agent(AgentConfig(device_id=device_id, seed=i), transport, trainer, data)
        agent.start()
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.01}, daemon=True))
    for thread in threads:
        thread.start()
    evaluator = OrtTrainer.open(bundle, threads=1)
    server = FederatedServer(
        InMemoryTransport(broker, "server"),
        bundle,
        config,
        evaluator=lambda w: evaluator.evaluate(w, split.test.x, split.test.y),
    )
    reached: dict[float, float | None] = dict.fromkeys(targets)
    trace: list[tuple[float, float]] = []
    server.start()
    server.wait_for_devices(n, 30)
    started = time.perf_counter()

    def on_version(result: RoundResult) -> None:
        accuracy = result.test_accuracy or 0.0
        trace.append((time.perf_counter() - started, accuracy))
        for target in targets:
            if reached[target] is None and accuracy >= target:
                reached[target] = time.perf_counter() - started

    server.run(on_version)
    server.close()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    for agent in agents:
        agent.close()
    mode = config.mode
    print(f"{mode}: " + " ".join(f"{t:.1f}s:{a:.3f}" for t, a in trace[:: max(1, len(trace) // 12)]), file=sys.stderr)
    return reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--spread", type=float, default=10.0, help="slowest device / fastest device")
    parser.add_argument("--buffer", type=int, default=5, help="FedBuff buffer size")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.90])
    parser.add_argument(
        "--rounds", type=int, default=40, help="sync rounds (async: versions = rounds × devices / buffer)"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    split = make_split(args.devices, args.alpha, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_digits_bundle(Path(tmp) / "bundle", model="mlp")
        common: dict[str, Any] = {
            "clients_per_round": args.devices,
            "min_clients": args.devices,
            "wait_for_clients_s": 30,
            "round_timeout_s": 120,
            "local_epochs": 1,
            "batch_size": 16,
            "lr": args.lr,
            "codecs": ("fp32",),
            "seed": args.seed,
        }
        sync = run_federation(bundle, split, ServerConfig(rounds=args.rounds, **common), args.spread, args.targets)
        versions = args.rounds * args.devices // args.buffer
        table = {"buffer_size": args.buffer, "concurrency": args.devices, "versions": versions}
        fedbuff = run_federation(
            bundle,
            split,
            ServerConfig(rounds=versions, mode="async", asynchronous=table, **common),
            args.spread,
            args.targets,
        )
    print(f"digits, {args.devices} devices (speeds 1x..{args.spread:g}x), MLP, in-memory transport, same partition")
    print(
        f"sync FedAvg: {args.rounds} rounds of {args.devices}; "
        f"async FedBuff: buffer {args.buffer}, concurrency {args.devices}\n"
    )
    print("| target accuracy | sync FedAvg (s) | async FedBuff (s) | sync / async |")
    print("|---|---|---|---|")
    for target in args.targets:
        s, a = sync[target], fedbuff[target]
        ratio = f"{s / a:.2f}x" if s is not None and a is not None else "n/a"
        show = lambda v: "not reached" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {target:.0%} | {show(s)} | {show(a)} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
