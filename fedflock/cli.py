"""The ``fedflock`` command: ``agent``, ``broker``, ``export``, ``demo``.

This tiny top-level package exists so that one console script can reach all three packages
without ``edge_agent`` importing the other two. Each subcommand imports its package only when
it runs, so ``fedflock agent`` works on a device that has only the ``agent`` extra (no torch).
Arguments are parsed once, here, into frozen config dataclasses.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from edge_agent.errors import ConfigError, FedflockError
from fedflock.backup_cli import add_backup_arguments, add_restore_arguments, run_backup, run_restore
from fedflock.broker_cli import add_broker_arguments, run_broker
from fedflock.enroll_cli import add_enroll_arguments, agent_enroll
from fedflock.export_options import add_export_options, export_kwargs
from fedflock.pki_cli import add_pki_arguments, run_pki

log = logging.getLogger("fedflock")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,8, got {text!r}") from exc
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedflock", description="Federated learning for edge devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="turn a PyTorch model into an on-device training bundle")
    exp.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. model_export.models:digits_cnn")
    exp.add_argument("--input-shape", type=_shape, required=True, metavar="C,H,W", help="one example, no batch")
    exp.add_argument("--input-dtype", choices=("float32", "int64"), default="float32", help="int64 for token ids")
    exp.add_argument("--num-classes", type=int, required=True)
    exp.add_argument("--out", type=Path, required=True)
    add_export_options(exp)
    exp.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: fp16 compute, fp32 master weights, dynamic loss scaling on the device",
    )

    agent = sub.add_parser(
        "agent",
        help="run the device agent (or show its state: fedflock agent status --config agent.toml)",
        description="Run a device agent from its config file (--config; docs/agent.md), or from flags "
        "(--bundle --data --device-id: a quick start with no sensors or policy).",
    )
    agent.add_argument("action", nargs="?", choices=("run", "status", "enroll"), default="run")
    agent.add_argument("--config", type=Path, default=None, help="agent.toml (device id, broker, data, policy, ...)")
    agent.add_argument("--json", action="store_true", help="status: print JSON")
    agent.add_argument("--bundle", type=Path, default=None, help="training bundle directory")
    agent.add_argument("--data", type=Path, default=None, help=".npz file with arrays x and y")
    agent.add_argument("--device-id", default=None)
    agent.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    agent.add_argument("--topic-prefix", default="fedflock/v1")
    agent.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    agent.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")
    agent.add_argument("--seed", type=int, default=0)
    agent.add_argument(
        "--state-dir", type=Path, default=None, help="device state (personal tensors); default: <data>.state"
    )
    agent.add_argument("--micro-batch", type=int, default=None, help="override the bundle's micro-batch (0: off)")
    agent.add_argument(
        "--network",
        default="unknown",
        choices=("ethernet", "wifi", "cellular", "unknown"),
        help="the link this device uses (picks the update codec; the resource monitor will detect it)",
    )
    agent.add_argument(
        "--codec-preference",
        action="append",
        default=[],
        metavar="NETWORK=CODEC[,CODEC...]",
        help="update codecs to prefer on a network type, e.g. cellular=topk-int8:0.01,int4 (repeatable)",
    )
    agent.add_argument("--no-error-feedback", action="store_true", help="do not carry the codec's residual over")
    add_enroll_arguments(agent)

    broker = sub.add_parser("broker", help="run the aggregation server")
    add_broker_arguments(broker)

    add_pki_arguments(sub.add_parser("pki", help="CA, certificates, passwords, ACL, mosquitto.conf, enrollment"))
    add_backup_arguments(sub.add_parser("backup", help="copy the server's SQLite store and model files into a tar"))
    add_restore_arguments(sub.add_parser("restore", help="verify a fedflock backup and restore it (or --check it)"))

    demo = sub.add_parser("demo", help="federated training of a digits CNN on one machine, end to end")
    demo.add_argument("--devices", type=int, default=20)
    demo.add_argument("--per-round", type=int, default=10)
    demo.add_argument("--rounds", type=int, default=20)
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration")
    demo.add_argument("--local-epochs", type=int, default=2)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--mqtt-url", default=None, help="use this broker instead of the embedded one")
    demo.add_argument("--topic-prefix", default="fedflock/v1")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("fedflock-demo"))
    demo.add_argument("--no-progress", action="store_true")

    from fedflock.simulate.cli import add_simulate_arguments

    add_simulate_arguments(sub.add_parser("simulate", help="a simulated device fleet (docs/simulator.md)"))
    return parser


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_export(args: argparse.Namespace) -> int:
    from model_export.exporter import export_bundle, load_factory

    model = load_factory(args.factory)()
    path = export_bundle(
        model,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        num_classes=args.num_classes,
        out_dir=args.out,
        precision=args.precision,
        **export_kwargs(args),
    )
    print(f"bundle written to {path}")
    return 0


def run_agent(args: argparse.Namespace) -> int:
    if args.action == "enroll":
        return agent_enroll(args)
    from fedflock import agent_cli

    if args.config is not None:
        agent_cli.check_no_legacy_flags(args)
        if args.action == "status":
            return agent_cli.agent_status(args.config, as_json=args.json)
        return agent_cli.run_agent_from_config(args.config, _stop_on_signals())
    if args.action == "status":
        raise ConfigError("fedflock agent status needs --config agent.toml")
    if args.bundle is None or args.data is None or args.device_id is None:
        raise ConfigError("fedflock agent needs --config agent.toml, or all of --bundle, --data and --device-id")
    return _run_agent_from_flags(args)


def _run_agent_from_flags(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent, AgentConfig
    from edge_agent.codecs import DEFAULT_PREFERENCES
    from edge_agent.data import load_npz
    from edge_agent.protocol.topics import Topics
    from edge_agent.runtime.bundle import Bundle
    from edge_agent.runtime.trainer import OrtTrainer
    from fedflock.wiring import device_transport

    topics = Topics(args.topic_prefix)
    state_dir = args.state_dir if args.state_dir is not None else Path(f"{args.data}.state")
    preferences = dict(DEFAULT_PREFERENCES)
    for item in args.codec_preference:
        network, sep, codecs = item.partition("=")
        if not sep or not network or not codecs:
            raise ConfigError(f"--codec-preference {item!r}: expected NETWORK=CODEC[,CODEC...]")
        preferences[network] = tuple(c for c in codecs.split(",") if c)
    config = AgentConfig(
        device_id=args.device_id,
        topics=topics,
        seed=args.seed,
        max_tasks=args.max_tasks,
        state_dir=state_dir,
        codec_preferences=preferences,
        error_feedback=not args.no_error_feedback,
    )
    bundle = Bundle.open(args.bundle)
    data = load_npz(args.data)
    transport = device_transport(
        args.mqtt_url, args.device_id, bundle_digest=bundle.digest, num_examples=len(data), topics=topics
    )
    trainer = OrtTrainer.open(bundle, threads=args.threads, micro_batch=args.micro_batch, lazy=True)
    trainer.check_data(data.x, data.y)  # fail now, not at the first task
    network = args.network
    agent = Agent(config, transport, trainer, data, network=lambda: network)
    stop = _stop_on_signals()
    agent.start()
    log.info("agent %s online at %s with %d examples", args.device_id, args.mqtt_url, len(data))
    try:
        agent.run(stop)
    finally:
        agent.close()
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from edge_agent.protocol.topics import Topics
    from fedflock.demo import DemoConfig, run_demo

    if not args.verbose:  # the progress bar and per-round lines say it all
        for name in ("fedflock.agent", "fedflock.server", "edge_agent.transport"):
            logging.getLogger(name).setLevel(logging.WARNING)
    report = run_demo(
        DemoConfig(
            devices=args.devices,
            per_round=args.per_round,
            rounds=args.rounds,
            alpha=args.alpha,
            local_epochs=args.local_epochs,
            lr=args.lr,
            mqtt_url=args.mqtt_url,
            topics=Topics(args.topic_prefix),
            seed=args.seed,
            out_dir=args.out,
            progress=not args.no_progress,
        )
    )
    accuracy = report.final_accuracy
    print(
        f"final test accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'} after "
        f"{len(report.results)} rounds in {report.wall_s:.1f}s"
    )
    print(f"metrics: {args.out / 'metrics.csv'}  plot: {args.out / 'accuracy.png'}  models: {args.out / 'models'}")
    return 0


OWN_LOGGERS = ("fedflock", "edge_agent", "broker_server", "model_export")
COMMANDS = {"export": run_export, "agent": run_agent, "broker": run_broker, "demo": run_demo_command, "pki": run_pki}
COMMANDS.update(backup=run_backup, restore=run_restore)


def run_simulate_command(args: argparse.Namespace) -> int:
    from fedflock.simulate.cli import run_simulate

    return run_simulate(args)


COMMANDS["simulate"] = run_simulate_command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Third-party libraries log at WARNING; fedflock's own packages at INFO (DEBUG with -v).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # amqtt warns about its own PUBACK bookkeeping on QoS 1 re-sends; nothing a user can act on
    logging.getLogger("amqtt").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except FedflockError as exc:
        print(f"fedflock {args.command}: error [{exc.code}]: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
