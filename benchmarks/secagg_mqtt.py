"""Secure aggregation over MQTT: a plain FedAvg round vs a secure round, real agents, real Mosquitto.

For each fleet size in ``--devices`` (10 25 50): a Mosquitto subprocess, that many real
:class:`~edge_agent.agent.Agent` threads (onnxruntime training the digits bundle, ``--model``: the
demo CNN, 6,282 aggregated values) over real MQTT connections, and two sync rounds over all of
them: one plain (codec ``--codec``, int8 by default), then one with ``[secagg]`` (clip ``--clip``,
8-bit codes; every device in the cohort, threshold ⌊2n/3⌋+1, nobody drops). Each round runs on a
fresh :class:`~broker_server.server.FederatedServer` whose transport is wrapped in a
:class:`~broker_server.ops.MeteredTransport`, so bytes are counted at the transport: payload bytes
the server received during the round (device → server: UPDATEs, or the secure messages) and sent
(TASKs, KeyList, ShareBundle, UnmaskRequest), per device. Server CPU is the thread CPU time of the
thread running the round (the dispatcher, decoding, folding, the secure-aggregation server);
wall is the round's duration (training included). Ratios are secure / plain.

    python benchmarks/secagg_mqtt.py [--devices 10 25 50] [--model cnn] [--codec int8]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.async_vs_sync import make_split
from benchmarks.compression import export_digits_bundle
from broker_server.mosquitto_process import MosquittoProcess
from broker_server.ops import MeteredTransport
from broker_server.server import FederatedServer, RoundResult, ServerConfig
from edge_agent.agent import Agent, AgentConfig
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport, parse_mqtt_url


@dataclass
class Counter:
    received: int = 0
    sent: int = 0

    def bytes_received(self, nbytes: int) -> None:
        self.received += nbytes

    def bytes_sent(self, nbytes: int) -> None:
        self.sent += nbytes


@dataclass(frozen=True)
class Measured:
    up: float
    down: float
    cpu_s: float
    wall_s: float
    result: RoundResult


def mqtt(url: str, client_id: str) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id))


def one_round(url: str, bundle: Bundle, n: int, prefix: Topics, name: str, **extra: Any) -> Measured:
    counter = Counter()
    config = ServerConfig(
        rounds=1,
        clients_per_round=n,
        min_clients=n,
        wait_for_clients_s=120,
        round_timeout_s=300,
        local_epochs=1,
        topics=prefix,
        model_channel=None,
        **extra,
    )
    server = FederatedServer(MeteredTransport(mqtt(url, name), counter), bundle, config)
    server.start()
    try:
        server.wait_for_devices(n, 120)
        counter.received = counter.sent = 0
        cpu, wall = time.thread_time(), time.perf_counter()
        result = server.run_round(1)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        server.close()
    if not result.completed:
        raise SystemExit(f"{name}: the round did not complete: {result.reason}")
    return Measured(counter.received / n, counter.sent / n, cpu, wall, result)


def fleet_rounds(bundle: Bundle, n: int, args: argparse.Namespace, work: Path) -> tuple[Measured, Measured]:
    split = make_split(n, alpha=5.0, seed=0)
    broker = MosquittoProcess(work / f"mosquitto-{n}")
    broker.start()
    prefix = Topics(f"bench-{n}/v1")
    stop = threading.Event()
    agents = [
        Agent(
            AgentConfig(device_id=f"d{i}", topics=prefix, seed=i),
            mqtt(broker.url, f"d{i}"),
            OrtTrainer.open(bundle, threads=1),
            split.devices[i],
        )
        for i in range(n)
    ]
    threads = [threading.Thread(target=a.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True) for a in agents]
    try:
        for agent in agents:
            agent.start()
        for thread in threads:
            thread.start()
        plain = one_round(broker.url, bundle, n, prefix, "plain", codecs=(args.codec,))
        secure = one_round(
            broker.url, bundle, n, prefix, "secure", secagg={"clip": args.clip, "quant_bits": 8}, codecs=(args.codec,)
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        broker.stop()
    return plain, secure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--codec", default="int8", help="the plain round's update codec")
    parser.add_argument("--clip", type=float, default=0.5, help="the secure round's clip c")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_digits_bundle(work / "bundle", args.model)
        size = sum(math.prod(t.shape) for t in bundle.manifest.aggregated_tensors)
        print(f"model {args.model}: {size:,} aggregated values; plain codec {args.codec}, secure b = 8")
        print(
            "| n | t | plain up B/dev | secure up B/dev | up ratio | plain down B/dev | secure down B/dev "
            "| down ratio | plain server CPU s | secure server CPU s | CPU ratio | plain wall s | secure wall s "
            "| wall ratio |"
        )
        print("|---:" * 14 + "|")
        for n in args.devices:
            plain, secure = fleet_rounds(bundle, n, args, work)
            t = (2 * n) // 3 + 1
            print(
                f"| {n} | {t} | {plain.up:,.0f} | {secure.up:,.0f} | {secure.up / plain.up:.2f}x "
                f"| {plain.down:,.0f} | {secure.down:,.0f} | {secure.down / plain.down:.2f}x "
                f"| {plain.cpu_s:.3f} | {secure.cpu_s:.3f} | {secure.cpu_s / plain.cpu_s:.1f}x "
                f"| {plain.wall_s:.1f} | {secure.wall_s:.1f} | {secure.wall_s / plain.wall_s:.2f}x |",
                flush=True,
            )
            if secure.result.reported != n:
                print(f"  (secure round: {secure.result.reported} of {n} survived)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
