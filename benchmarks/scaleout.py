"""Scale-out: updates/s counted with 1, 2 and 3 workers, real Mosquitto and real PostgreSQL, one script run.

A throw-away Mosquitto and PostgreSQL (``fsync=off``: the disk is not what is measured) are
started; for each worker count a fresh store schema gets version 0 and one open round of
``--updates`` tasks (as the coordinator would create it), ``W`` worker *processes* (this script
with ``worker``: a real :class:`~broker_server.scaleout.ScaleoutWorker`, one MQTT client and one
database connection each) join ``$share/fedflock-workers/...``, and ``--publishers`` synthetic
device threads publish one encoded ``--params``-parameter int8 UPDATE per task (QoS 1, one
MQTT client each) as fast as the broker acknowledges them. Measured:

* accepted/s: updates from the first publish until the store holds a claim for every one
  (decoded, validated, claimed in PostgreSQL, folded);
* publish/s: how fast the devices got their updates into Mosquitto (an upper bound here);
* close: seconds from closing the round to the combined, checked aggregate (workers' last
  flush of 8 MB float64 sums each, read back, :func:`combine_partials`).

Every run checks the combined aggregate: ``count == updates`` and the union of the partials is
every task (no loss, no double count).

    python benchmarks/scaleout.py [--updates 200] [--params 1000000] [--workers 1 2 3] [--publishers 3]

On a machine with 2 cores a third worker process cannot add CPU, and the publishers, Mosquitto
and PostgreSQL share the same cores: read the ratios with that in mind (docs/scaleout.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker_server.aggregate import WeightedMean  # noqa: E402
from broker_server.mosquitto_process import MosquittoProcess  # noqa: E402
from broker_server.persistence import ModelVersionRow, PostgresServerStore, RoundRow  # noqa: E402
from broker_server.persistence.postgres_process import PostgresProcess  # noqa: E402
from broker_server.persistence.scaleout import ScaleoutLedger  # noqa: E402
from broker_server.round_plan import RoundPlan  # noqa: E402
from broker_server.scaleout import ScaleoutSettings, ScaleoutWorker, combine_partials  # noqa: E402
from edge_agent.codecs import CodecSpec, encode_update  # noqa: E402
from edge_agent.protocol.binding import TaskBinding  # noqa: E402
from edge_agent.protocol.manifest import TensorSpec  # noqa: E402
from edge_agent.protocol.messages import UpdateMessage, encode_message  # noqa: E402
from edge_agent.protocol.topics import Topics  # noqa: E402
from fedflock.wiring import server_transport  # noqa: E402

BASE = "b" * 64  # the digest of the TASK payload the updates answer (64 hex digits)


def specs(params: int) -> tuple[TensorSpec, ...]:
    """Two tensors: a (params/1000 x 1000) weight and a 1000 bias (~``params`` parameters)."""
    rows = max(params // 1000 - 1, 1)
    return tuple(
        TensorSpec(name=name, shape=shape, dtype="float32", role="parameter", trainable=True, aggregate=True)
        for name, shape in (("w", (rows, 1000)), ("b", (1000,)))
    )


def nonce(task_id: str) -> str:
    """The task's binding nonce (32 hex digits, as the protocol wants)."""
    return f"{int(task_id[1:]):032x}"


def task_ids(updates: int) -> dict[str, str]:
    return {f"t{i:05d}": f"dev{i:05d}" for i in range(updates)}


def prepare(store: PostgresServerStore, updates: int, params: int) -> None:
    """Version 0 and round 1 with ``updates`` bound tasks, as the coordinator stores them."""
    weights = {s.name: np.zeros(s.shape, np.float32) for s in specs(params)}
    store.put_model_version(
        ModelVersionRow(version=0, parent=None, bundle_digest="bench", created_at=0, weights=weights)
    )
    plan = RoundPlan(
        epochs=1, batch_size=8, lr=0.1, hyperparameters={}, frozen=(), codecs=("int8",), max_chunk_bytes=64 << 20,
        wanted=updates, timeout_s=600.0, strategy="fedavg",
    )  # fmt: skip
    tasks = task_ids(updates)
    bindings = {t: TaskBinding(nonce=nonce(t), base_digest=BASE) for t in tasks}
    row = RoundRow(
        round=1, model_version=0, tasks=tasks, bindings=bindings, deadline=9e9, created_at=0, config=plan.to_json()
    )
    store.create_round(row)


def publish(url: str, topics: Topics, tasks: list[tuple[str, str]], payload: bytes, name: str) -> None:
    transport = server_transport(url, name)
    transport.start()
    try:
        for task_id, device_id in tasks:
            update = UpdateMessage(
                device_id=device_id, round=1, task_id=task_id, model_version=0, num_examples=10, metrics={},
                codec="int8", payload=payload, attempt=1, nonce=nonce(task_id), base_digest=BASE,
            )  # fmt: skip
            transport.publish(topics.results(device_id), encode_message(update), qos=1)
    finally:
        transport.close()


def run_worker(args: argparse.Namespace) -> None:
    """``scaleout.py worker ...``: one worker process until SIGTERM."""
    store = PostgresServerStore.open(args.conninfo, schema=args.schema)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = ScaleoutSettings(worker_id=args.id, heartbeat_s=0.05, flush_interval_s=2.0, lease_s=30.0)
    worker = ScaleoutWorker(
        server_transport(args.url, f"bench-{args.id}"),
        specs(args.params),
        store=store,
        ledger=ScaleoutLedger(store, clock=time.time),
        settings=settings,
        topics=Topics(args.prefix),
    )
    worker.start()
    try:
        worker.run(stop)
    finally:
        store.close()
    print(f"{args.id}: {worker.accepted} accepted, {worker.duplicates} duplicates, {len(worker.rejections)} rejected")


def measure(mosquitto: MosquittoProcess, pg: PostgresProcess, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    schema, prefix = f"bench_{uuid.uuid4().hex[:8]}", f"bench{uuid.uuid4().hex[:6]}/v1"
    conninfo = pg.conninfo("postgres")
    store = PostgresServerStore.open(conninfo, schema=schema)
    ledger = ScaleoutLedger(store, clock=time.time)
    prepare(store, args.updates, args.params)
    command = [sys.executable, __file__, "worker", "--url", mosquitto.url, "--conninfo", conninfo, "--schema", schema]
    command += ["--prefix", prefix, "--params", str(args.params)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([*command, "--id", f"w{i}"], env=env) for i in range(workers)]
    try:
        deadline = time.monotonic() + 60
        while sum(w.status == "alive" and w.beats > 0 for w in ledger.workers()) < workers:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        ledger.open_round(1)
        rng = np.random.default_rng(0)
        delta = {s.name: (0.01 * rng.standard_normal(s.shape)).astype(np.float32) for s in specs(args.params)}
        payload = encode_update(delta, CodecSpec.parse("int8"), rng=rng)
        tasks = sorted(task_ids(args.updates).items())
        shares = [tasks[i :: args.publishers] for i in range(args.publishers)]
        threads = [
            threading.Thread(target=publish, args=(mosquitto.url, Topics(prefix), share, payload, f"pub-{schema}-{i}"))
            for i, share in enumerate(shares)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        published = 0.0
        while (accepted := ledger.counts(1)[0]) < args.updates:
            if not published and not any(t.is_alive() for t in threads):
                published = time.perf_counter() - start
            stuck = published and time.perf_counter() - start > published + 60
            assert not stuck, f"only {accepted} of {args.updates} accepted a minute after the last publish"
            time.sleep(0.01)
        took = time.perf_counter() - start
        for thread in threads:
            thread.join()
        published = published or took
        closing = time.perf_counter()
        ledger.close(1)
        while ledger.counts(1)[2]:
            time.sleep(0.01)
        claims = ledger.claims(1)
        combined = combine_partials([(p.session, p.checkpoint) for p in ledger.partials(1)], frozenset(claims))
        assert combined.count == args.updates and combined.accepted == frozenset(task_ids(args.updates))
        WeightedMean.restore(combined.sums, total_weight=combined.total_weight, count=combined.count).result()
        close_s = time.perf_counter() - closing
        spread = sorted(sum(1 for c in claims.values() if c.session == w.session) for w in ledger.workers())
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        store.close()
    return {
        "accepted_s": args.updates / took,
        "publish_s": args.updates / published,
        "close_s": close_s,
        "spread": spread,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker")
    for flag in ("--url", "--conninfo", "--schema", "--prefix", "--id"):
        worker.add_argument(flag, required=True)
    worker.add_argument("--params", type=int, required=True)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--publishers", type=int, default=3)
    args = parser.parse_args()
    if args.command == "worker":
        run_worker(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, PostgresProcess() as pg:
        mosquitto = MosquittoProcess(Path(tmp))
        mosquitto.start()
        try:
            rows = [(w, measure(mosquitto, pg, w, args)) for w in args.workers]
        finally:
            mosquitto.stop()
    base = rows[0][1]["accepted_s"]
    what = f"{args.updates} int8 updates of {args.params:,} parameters, {args.publishers} publishers"
    print(f"\n{what}, {os.cpu_count()} CPUs\n")
    print("| workers | accepted updates/s | vs 1 worker | publish/s | close (s) | updates per worker |")
    print("|---|---|---|---|---|---|")
    for count, row in rows:
        print(
            f"| {count} | {row['accepted_s']:.1f} | {row['accepted_s'] / base:.2f}x | {row['publish_s']:.1f} | "
            f"{row['close_s']:.2f} | {row['spread']} |"
        )


if __name__ == "__main__":
    main()
