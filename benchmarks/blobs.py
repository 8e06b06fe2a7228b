"""Claim check vs chunked MQTT for large uploads (issue 9): wall time and Mosquitto's peak RSS.

One script run, every scenario on a **fresh** Mosquitto (so its peak resident memory belongs to
that scenario alone), a device and a server as two MQTT clients in this process:

* ``chunked`` — the UPDATE envelope as acknowledged CHUNKs (256 KiB, window 8) through the broker,
  reassembled and sha256-verified by the server (:class:`edge_agent.transfer.TransferLink`, the
  path an agent uses without a blob store);
* ``claim-local`` — grant -> presigned PUT to :class:`broker_server.blob_http.LocalBlobServer` ->
  CLAIM reference over MQTT -> the server reads the object from its store, verifies, deletes,
  acks (:class:`edge_agent.blobs.ClaimUploads`, :class:`broker_server.blob_claims.ServerClaims`);
* ``claim-s3`` — the same against a real S3-compatible server (``moto_server`` subprocess,
  path-style, single PUT; the server GETs the object back with SigV4).

Wall time runs from the device's first byte out to the server holding the decoded, verified
UPDATE and the device holding the ack. Broker peak RSS is the kernel's high-water mark
(``VmHWM`` of the Mosquitto process) at the end of the scenario; "idle" is its RSS before.

    python benchmarks/blobs.py [--sizes-mb 50 200] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_server.blob_claims import ServerClaims
from broker_server.blob_http import LocalBlobServer
from broker_server.blobs import BlobsConfig
from broker_server.mosquitto_process import MosquittoProcess
from edge_agent.blobs import BlobStore, ClaimUploads, LocalBlobStore
from edge_agent.protocol.claim_messages import ClaimAck, ClaimReference
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.transfer import DONE, TransferLink
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from tests.edge_agent.blobs.moto_server import MotoS3

CHUNK = 256 * 1024
DEVICE = "bench-dev"


@dataclass(frozen=True)
class Row:
    scenario: str
    size_mb: int
    wall_s: float
    broker_idle_mib: float
    broker_peak_mib: float


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


@contextmanager
def _broker(workdir: Path) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(workdir / uuid.uuid4().hex[:8])
    broker.workdir.mkdir(parents=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _transport(broker: MosquittoProcess, client_id: str) -> MqttTransport:
    return MqttTransport(MqttConfig(host=broker.host, port=broker.port, client_id=client_id))


def _envelope(size: int) -> bytes:
    update = UpdateMessage(
        device_id=DEVICE,
        round=1,
        task_id="t-1",
        model_version=0,
        num_examples=1,
        codec="fp32",
        payload=os.urandom(size),
    )
    return encode_message(update)


def _serve(server: MqttTransport, topics: Topics, handle: Callable[[object, str], bool], stop: threading.Event) -> None:
    """The server's loop: decode what arrives on results topics until ``handle`` says it is done."""
    while not stop.is_set():
        inbound = server.receive(timeout=0.2)
        if inbound is None:
            continue
        device_id, _ = topics.parse(inbound.topic)
        if handle(decode_message(inbound.payload), device_id):
            return


def run_chunked(broker: MosquittoProcess, envelope: bytes, _: object) -> float:
    topics = Topics(prefix=f"bench-{uuid.uuid4().hex[:6]}/v1")
    server, device = _transport(broker, "bench-server"), _transport(broker, DEVICE)
    server.start()
    device.start()
    server.subscribe(topics.results("+"), qos=1)
    device.subscribe(topics.tasks(DEVICE), qos=1)
    server_link, device_link = TransferLink(server), TransferLink(device)
    got: list[bytes] = []

    def handle(message: object, device_id: str) -> bool:
        assert isinstance(message, ChunkMessage | ChunkAck)
        whole = server_link.handle(message, topics.tasks(device_id))
        if whole is not None:
            got.append(whole)
        return whole is not None

    stop = threading.Event()
    loop = threading.Thread(target=_serve, args=(server, topics, handle, stop), daemon=True)
    loop.start()

    def pump(timeout: float) -> None:
        inbound = device.receive(timeout=timeout)
        if inbound is not None:
            message = decode_message(inbound.payload)
            assert isinstance(message, ChunkAck)
            device_link.handle(message, topics.results(DEVICE))

    started = time.perf_counter()
    try:
        transfer = device_link.send(
            topics.results(DEVICE), envelope, device_id=DEVICE, round=1, task_id="t-1", chunk_size=CHUNK
        )
        device_link.wait(transfer, pump, timeout_s=900)
        elapsed = time.perf_counter() - started
        assert device_link.state(transfer) == DONE
        loop.join(60)
        assert got and len(got[0]) == len(envelope)
    finally:
        stop.set()
        device.close()
        server.close()
    return elapsed


def run_claim(broker: MosquittoProcess, envelope: bytes, store: object) -> float:
    assert isinstance(store, BlobStore)
    topics = Topics(prefix=f"bench-{uuid.uuid4().hex[:6]}/v1")
    claims = ServerClaims(store, BlobsConfig(threshold=1 << 20, max_object_bytes=1 << 31))
    server, device = _transport(broker, "bench-server"), _transport(broker, DEVICE)
    server.start()
    device.start()
    server.subscribe(topics.results("+"), qos=1)
    device.subscribe(topics.tasks(DEVICE), qos=1)
    got: list[object] = []

    def handle(message: object, device_id: str) -> bool:
        assert isinstance(message, ClaimReference)
        publish = lambda data: server.publish(topics.tasks(device_id), data, qos=1)  # noqa: E731
        got.append(decode_message(claims.handle(message, device_id, publish)))
        return True

    stop = threading.Event()
    loop = threading.Thread(target=_serve, args=(server, topics, handle, stop), daemon=True)
    loop.start()
    uploads = ClaimUploads(DEVICE, lambda data: device.publish(topics.results(DEVICE), data, qos=1), ack_timeout_s=900)
    server.publish(topics.tasks(DEVICE), claims.grant_envelope(DEVICE, 1, "t-1", 900.0), qos=1)
    grant = decode_message(device.receive(timeout=10).payload)  # type: ignore[union-attr]
    assert uploads.accepts(grant)
    uploads.handle(grant)

    def pump(timeout: float) -> None:
        inbound = device.receive(timeout=timeout)
        if inbound is not None:
            message = decode_message(inbound.payload)
            assert isinstance(message, ClaimAck)
            uploads.handle(message)

    started = time.perf_counter()
    try:
        outcome = uploads.send(envelope, 1, "t-1", pump)
        elapsed = time.perf_counter() - started
        loop.join(60)
        assert outcome == "done", outcome
        assert got and isinstance(got[0], UpdateMessage)
    finally:
        stop.set()
        device.close()
        server.close()
    return elapsed


def measure(
    workdir: Path, scenario: str, size_mb: int, run: Callable[[MosquittoProcess, bytes, object], float], store: object
) -> Row:
    envelope = _envelope(size_mb * 1_000_000)
    with _broker(workdir) as broker:
        pid = broker.pid
        assert pid is not None
        idle = _status_kib(pid, "VmRSS")
        wall = run(broker, envelope, store)
        peak = _status_kib(pid, "VmHWM")
    return Row(scenario, size_mb, wall, idle / 1024, peak / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest wall time is kept")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedflock-blobs-bench-") as tmp:
        workdir = Path(tmp)
        secret = os.urandom(32)
        local = LocalBlobStore(workdir / "store", secret=secret, max_bytes=1 << 31)
        http = LocalBlobServer(local, secret, max_put_bytes=1 << 31)
        http.start()
        local.base_url = http.url
        moto = MotoS3(workdir, auth=False)
        moto.start()
        try:
            s3 = moto.store("fedflock-bench", part_size=16 << 20, multipart_threshold=64 << 20)
            scenarios: list[tuple[str, Callable[[MosquittoProcess, bytes, object], float], object]] = [
                ("chunked MQTT", run_chunked, None),
                ("claim check, local", run_claim, local),
                ("claim check, S3 (moto)", run_claim, s3),
            ]
            for size in args.sizes_mb:
                for name, run, store in scenarios:
                    best = min(
                        (measure(workdir, name, size, run, store) for _ in range(args.repeats)),
                        key=lambda row: row.wall_s,
                    )
                    rows.append(best)
                    print(
                        f"{name:24s} {size:4d} MB  {best.wall_s:7.2f} s  broker peak {best.broker_peak_mib:7.1f} MiB",
                        file=sys.stderr,
                    )
        finally:
            moto.stop()
            http.close()
    print(table(rows))
    return 0


def table(rows: list[Row]) -> str:
    chunked = {row.size_mb: row for row in rows if row.scenario == "chunked MQTT"}
    lines = [
        "| payload | path | wall time | vs chunked | broker RSS idle | broker RSS peak | peak vs chunked |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = chunked.get(row.size_mb)
        speed = f"{row.wall_s / base.wall_s:.2f}×" if base else "n/a"
        memory = f"{row.broker_peak_mib / base.broker_peak_mib:.2f}×" if base else "n/a"
        lines.append(
            f"| {row.size_mb} MB | {row.scenario} | {row.wall_s:.2f} s | {speed} | "
            f"{row.broker_idle_mib:.1f} MiB | {row.broker_peak_mib:.1f} MiB | {memory} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
