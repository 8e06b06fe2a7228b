"""The ``fedflock simulate`` arguments, parsed once into a :class:`SimulateConfig`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from edge_agent.protocol.topics import Topics
from edge_agent.transport.backoff import JITTER_MODES, ReconnectSettings
from fedflock.simulate.mixes import MIXES
from fedflock.simulate.run import SimulateConfig

__all__ = ["add_simulate_arguments", "config_from_args", "run_simulate"]


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="mixed", help=f"{'|'.join(MIXES)} or a mix .toml file (docs/simulator.md)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="worker processes hosting devices")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same fleet")
    parser.add_argument("--mqtt-url", default=None, help="use this broker instead of starting one")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--bundle", type=Path, default=None, help="a digits bundle (default: export one; needs torch)")
    parser.add_argument("--time-scale", type=float, default=60.0, help="simulated seconds per real second")
    parser.add_argument("--start-hour", type=float, default=8.0, help="simulated local time at the start")
    parser.add_argument("--tick-s", type=float, default=2.0, help="how often each agent is ticked (real seconds)")
    parser.add_argument("--threads", type=int, default=8, help="agent driver threads per process")
    parser.add_argument("--slots", type=int, default=1, help="concurrent trainings per process")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--over-selection", type=float, default=1.2)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--reconnect-min-s", type=float, default=1.0)
    parser.add_argument("--reconnect-max-s", type=float, default=60.0)
    parser.add_argument("--reconnect-jitter", choices=JITTER_MODES, default="full")
    parser.add_argument("--topic-prefix", default="fedflock/v1")
    parser.add_argument("--out", type=Path, default=Path("fedflock-sim"))
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> SimulateConfig:
    return SimulateConfig(
        devices=args.devices,
        per_round=args.per_round,
        rounds=args.rounds,
        profile=args.profile,
        processes=args.processes,
        seed=args.seed,
        mqtt_url=args.mqtt_url,
        broker=args.broker,
        bundle=args.bundle,
        out_dir=args.out,
        time_scale=args.time_scale,
        start_hour=args.start_hour,
        tick_s=args.tick_s,
        threads=args.threads,
        slots=args.slots,
        local_epochs=args.local_epochs,
        lr=args.lr,
        round_timeout_s=args.round_timeout,
        over_selection=args.over_selection,
        reconnect=ReconnectSettings(
            min_s=args.reconnect_min_s, max_s=args.reconnect_max_s, jitter=args.reconnect_jitter
        ),
        topics=Topics(args.topic_prefix),
        progress=not args.no_progress,
    )


def run_simulate(args: argparse.Namespace) -> int:
    from fedflock.simulate.run import run_simulation

    if not args.verbose:  # the per-round lines say it all
        for name in ("fedflock.agent", "fedflock.server", "edge_agent.transport", "fedflock.store"):
            logging.getLogger(name).setLevel(logging.WARNING)
    report = run_simulation(config_from_args(args))
    summary = report.summary
    accuracy = summary["final_test_accuracy"]
    print(
        f"{summary['rounds_completed']}/{len(report.rows)} rounds completed, mean round "
        f"{summary['mean_round_s'] or float('nan'):.1f}s, final test accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}, wall {summary['wall_s']:.1f}s"
    )
    print("outputs: " + "  ".join(str(p) for p in report.outputs.values()))
    return 0
