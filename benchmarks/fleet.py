"""Fleet benchmarks (issue 8): rounds at 1,000 devices, 10,000 idle devices, reconnect storm.

    python3 -m benchmarks.fleet rounds --bundle DIR          # (a) 1,000 devices, 100 per round
    python3 -m benchmarks.fleet idle --devices 10000          # (b) idle devices: broker/server/client RSS, CPU
    python3 -m benchmarks.fleet storm --devices 1000          # (c) restart Mosquitto: full jitter vs none

Each part prints a table (and writes ``<out>/<part>.json``). Real Mosquitto, real agents in
``--processes`` worker processes (``fedflock.simulate``). The idle part raises the soft limit
on open files to the hard limit (``resource.setrlimit``) before it starts Mosquitto and the
workers (they inherit it), and gives Mosquitto ``max_connections -1`` (its default, unlimited):
10,000 clients need 10,000 descriptors in the broker and in the client processes together.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from edge_agent.transport.backoff import ReconnectSettings


def _raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def _bundle(path: Path | None, out: Path) -> Path:
    if path is not None:
        return path
    from fedflock.demo import export_demo_bundle

    return export_demo_bundle(out / "bundle", lr=0.05).directory


def rounds(args: argparse.Namespace, out: Path) -> dict[str, object]:
    from fedflock.simulate.run import SimulateConfig, run_simulation

    _raise_fd_limit()
    report = run_simulation(
        SimulateConfig(
            devices=args.devices,
            per_round=args.per_round,
            rounds=args.rounds,
            profile=args.profile,
            processes=args.processes,
            bundle=_bundle(args.bundle, out),
            out_dir=out / "rounds",
            tick_s=5.0,
            round_timeout_s=60.0,
            over_selection=1.2,
            progress=True,
        )
    )
    done = [r for r in report.rows if r.completed]
    times = [r.duration_s for r in done]
    return {
        "devices": args.devices,
        "per_round": args.per_round,
        "processes": args.processes,
        "rounds_completed": len(done),
        "round_s_mean": sum(times) / len(times) if times else None,
        "round_s_max": max(times) if times else None,
        "goal_s": 30.0,
        "final_accuracy": report.summary["final_test_accuracy"],
        "workers": report.summary["workers"],
    }


def idle(args: argparse.Namespace, out: Path) -> dict[str, object]:
    import psutil

    from broker_server.mosquitto_process import MosquittoProcess
    from edge_agent.runtime.bundle import Bundle
    from fedflock.simulate.pool import WorkerPool
    from fedflock.simulate.run import SimulateConfig, start_messages
    from fedflock.wiring import server_transport

    limits = _raise_fd_limit()
    bundle = Bundle.open(_bundle(args.bundle, out))
    config = SimulateConfig(
        devices=args.devices,
        per_round=1,
        processes=args.processes,
        profile="gateways",
        tick_s=30.0,
        threads=2,
        examples=(8, 8),
        out_dir=out / "idle",
    )
    with MosquittoProcess(out / "idle" / "mosquitto", extra_config=("max_connections -1",)) as broker:
        from broker_server.server import FederatedServer, ServerConfig

        server = FederatedServer(server_transport(broker.url, "bench-idle-server"), bundle, ServerConfig(rounds=1))
        server.start()
        pool = WorkerPool(args.processes, out / "idle" / "workers")
        pool.spawn()
        try:
            started = time.monotonic()
            ready = pool.request(start_messages(config, broker.url, bundle, time.time()))
            connect_s = time.monotonic() - started
            deadline = time.monotonic() + 120
            while len(server.registry) < args.devices and time.monotonic() < deadline:
                server.serve(0.5)
            broker_proc = psutil.Process(broker._process.pid)  # type: ignore[union-attr]
            me = psutil.Process()
            before = [s["cpu_s"] for s in pool.request({"cmd": "stats"})]
            b0, s0 = broker_proc.cpu_times(), me.cpu_times()
            server.serve(args.idle_s)  # the server keeps pumping its transport, as when waiting
            b1, s1 = broker_proc.cpu_times(), me.cpu_times()
            stats = pool.request({"cmd": "stats"})
            result = {
                "devices": args.devices,
                "connected": sum(s["connected"] for s in stats),
                "server_saw": len(server.registry),
                "connect_s": connect_s,
                "fd_limit": {"before": limits[0], "now": limits[1]},
                "idle_s": args.idle_s,
                "broker_rss_mib": broker_proc.memory_info().rss / 2**20,
                "broker_cpu_pct": 100 * ((b1.user + b1.system) - (b0.user + b0.system)) / args.idle_s,
                "server_rss_mib": me.memory_info().rss / 2**20,
                "server_cpu_pct": 100 * ((s1.user + s1.system) - (s0.user + s0.system)) / args.idle_s,
                "client_rss_mib": [s["rss_bytes"] / 2**20 for s in stats],
                "client_cpu_pct": [100 * (s["cpu_s"] - b) / args.idle_s for s, b in zip(stats, before, strict=True)],
                "ready": ready,
            }
        finally:
            pool.stop(timeout=300)
            server.close()
    return result


def storm(args: argparse.Namespace, out: Path) -> dict[str, object]:
    from fedflock.simulate.storm import run_storm

    _raise_fd_limit()
    bundle = _bundle(args.bundle, out)
    rows = []
    for jitter in ("full", "none"):
        result = run_storm(
            out / f"storm-{jitter}",
            bundle=bundle,
            devices=args.devices,
            processes=args.processes,
            reconnect=ReconnectSettings(min_s=args.window_s, max_s=60.0, jitter=jitter),
            timeout_s=180.0,
            bucket_s=1.0,
        )
        rows.append(result.as_row())
        print(result.as_row(), flush=True)
    full_peak, none_peak = (float(str(row["peak_attempts_per_s"])) for row in rows)
    return {"rows": rows, "peak_ratio_none_over_full": none_peak / max(full_peak, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("rounds", "idle", "storm"))
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="gateways")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--window-s", type=float, default=5.0, help="storm: the first backoff window")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.devices is None:
        args.devices = {"rounds": 1000, "idle": 10_000, "storm": 1000}[args.part]
    out = args.out or Path(tempfile.mkdtemp(prefix=f"fleet-{args.part}-"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"rounds": rounds, "idle": idle, "storm": storm}[args.part](args, out)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
