"""Claim check end to end over real parts: Mosquitto, moto_server (S3) and the device's and server's
claim objects on real MQTT transports. A 3 MB UPDATE leaves the device by presigned PUT, MQTT carries
only the reference, the server reads the object from the bucket, verifies it and acknowledges.
Then the wired system: a FederatedServer with a ``[blobs]`` table and real agents (onnxruntime,
digits), every update by claim check, on the local backend (LocalBlobServer) and on S3 (moto):
the rounds complete with the model inline uploads give, and no object is left behind; a model
bundle fetched by claim check and installed (a corrupted copy left in the store by an earlier run
is replaced), and one corrupted in the store after it was written refused with nothing installed."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.blob_claims import ServerClaims
from broker_server.blobs import BlobsConfig
from broker_server.mosquitto_process import MosquittoProcess
from broker_server.server import FederatedServer, RoundResult, ServerConfig
from edge_agent.agent import Agent
from edge_agent.agent_config import AgentConfig
from edge_agent.blobs import BlobInfo, ClaimRefused, ClaimUploads, LocalBlobStore, content_key
from edge_agent.data import Dataset
from edge_agent.ota import DownloadStaging, ModelStore, ModelUpdater, UpdaterConfig
from edge_agent.ota.archive import pack_bundle
from edge_agent.ota.validation import evaluation_validator
from edge_agent.presence import offline_will, online_birth
from edge_agent.protocol.claim_messages import ClaimAck, ClaimReference
from edge_agent.protocol.messages import UpdateMessage, decode_message, encode_message
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.mqtt import MqttConfig, MqttTransport
from edge_agent.transport.mqtt_config import parse_mqtt_url
from tests.edge_agent.blobs.moto_server import MotoS3
from tests.edge_agent.ota import derive_bundle
from tests.fixtures import digits_split

pytestmark = pytest.mark.integration


def _transport(broker: MosquittoProcess, client_id: str) -> MqttTransport:
    return MqttTransport(MqttConfig(host=broker.host, port=broker.port, client_id=client_id))


def _serve(
    transport: MqttTransport, claims: ServerClaims, topics: Topics, got: list[object], stop: threading.Event
) -> None:
    while not stop.is_set():
        inbound = transport.receive(timeout=0.2)
        if inbound is None:
            continue
        message = decode_message(inbound.payload)
        device_id, _ = topics.parse(inbound.topic)
        if isinstance(message, ClaimReference):
            publish = lambda data, d=device_id: transport.publish(topics.tasks(d), data, qos=1)  # noqa: E731
            try:
                got.append(decode_message(claims.handle(message, device_id, publish)))
            except ClaimRefused as exc:
                got.append(exc)


@pytest.mark.parametrize("tamper", [False, True])
def test_update_by_claim_check_over_mosquitto_and_s3(
    mosquitto: MosquittoProcess, moto_s3: MotoS3, tamper: bool
) -> None:
    topics = Topics(prefix=f"claim-{uuid.uuid4().hex[:8]}/v1")
    store = moto_s3.store(f"claims-{uuid.uuid4().hex[:8]}")
    claims = ServerClaims(store, BlobsConfig(backend="s3", threshold=1 << 20, endpoint=moto_s3.endpoint, bucket="x"))
    server, device = (
        _transport(mosquitto, f"fedflock-server-{uuid.uuid4().hex[:6]}"),
        _transport(mosquitto, "dev-claim"),
    )
    server.start()
    device.start()
    server.subscribe(topics.results("+"), qos=1)
    device.subscribe(topics.tasks("dev-claim"), qos=1)
    got: list[object] = []
    stop = threading.Event()
    loop = threading.Thread(target=_serve, args=(server, claims, topics, got, stop), daemon=True)
    loop.start()
    try:
        update = UpdateMessage(
            device_id="dev-claim",
            round=1,
            task_id="t-1",
            model_version=0,
            num_examples=10,
            codec="fp32",
            payload=os.urandom(3 << 20),
        )
        envelope = encode_message(update)
        server.publish(topics.tasks("dev-claim"), claims.grant_envelope("dev-claim", 1, "t-1", 60.0), qos=1)
        uploads = ClaimUploads(
            "dev-claim", lambda data: device.publish(topics.results("dev-claim"), data, qos=1), ack_timeout_s=30
        )
        grant_msg = decode_message(device.receive(timeout=10).payload)  # type: ignore[union-attr]
        assert uploads.accepts(grant_msg)
        uploads.handle(grant_msg)
        if tamper:  # a device pointing at another object than its grant is refused and told to use MQTT
            real = uploads.grant("t-1")
            assert real is not None
            uploads.handle(type(real)(**{**real.__dict__, "key": "updates/someone-else"}))

        def pump(timeout: float) -> None:
            inbound = device.receive(timeout=timeout)
            if inbound is not None:
                message = decode_message(inbound.payload)
                assert isinstance(message, ClaimAck)
                uploads.handle(message)

        outcome = uploads.send(envelope, 1, "t-1", pump)
    finally:
        stop.set()
        loop.join(5)
        device.close()
        server.close()
    if tamper:
        assert outcome is None  # the caller sends it by MQTT: nothing lost
        assert isinstance(got[0], ClaimRefused) and "names no object granted" in got[0].reason
    else:
        assert outcome == "done"
        assert got == [update]  # byte-identical UPDATE, verified by sha256 on the server
        assert uploads.grant("t-1") is None


# -- the wired system: FederatedServer + Agents -------------------------------------------------

S3_KEY_ENV, S3_SECRET_ENV = "FEDFLOCK_TEST_S3_KEY", "FEDFLOCK_TEST_S3_SECRET"
THRESHOLD = 1024  # every digits UPDATE (fp32, ~tens of kB) is larger: all go by claim check


def _blobs_table(backend: str, tmp_path: Path, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    if backend == "local":
        return {"backend": "local", "threshold": THRESHOLD, "root": str(tmp_path / "blobs"), "listen_port": 0}
    bucket = f"fl-{uuid.uuid4().hex[:10]}"
    moto_s3.store(bucket)  # created here, as an operator would; the server never creates buckets
    monkeypatch.setenv(S3_KEY_ENV, moto_s3.credentials.access_key)
    monkeypatch.setenv(S3_SECRET_ENV, moto_s3.credentials.secret_key)
    return {
        "backend": "s3",
        "threshold": THRESHOLD,
        "endpoint": moto_s3.endpoint,
        "bucket": bucket,
        "access_key_env": S3_KEY_ENV,
        "secret_key_env": S3_SECRET_ENV,
    }


def _stored_keys(table: dict[str, Any], moto_s3: MotoS3) -> list[str]:
    """Every object key in the store (moto without authentication lists a bucket unsigned)."""
    if table["backend"] == "local":
        data = Path(table["root"]) / "data"
        return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()) if data.is_dir() else []
    with urllib.request.urlopen(f"{moto_s3.endpoint}/{table['bucket']}?list-type=2", timeout=10) as response:
        return re.findall(r"<Key>([^<]+)</Key>", response.read().decode())


def _mqtt(url: str, client_id: str, **options: Any) -> MqttTransport:
    host, port = parse_mqtt_url(url)
    return MqttTransport(MqttConfig(host=host, port=port, client_id=client_id, **options))


def _federation(
    url: str, bundle: Bundle, data: list[Dataset], blobs: dict[str, Any] | None
) -> tuple[dict[str, np.ndarray], list[RoundResult], FederatedServer]:
    """Two rounds of two real agents (threads, own MQTT connections) and a real server."""
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"claimrun-{run}/v1")
    config = ServerConfig(
        rounds=2,
        clients_per_round=2,
        min_clients=2,
        wait_for_clients_s=30,
        round_timeout_s=30,
        local_epochs=1,
        codecs=("fp32",),
        topics=topics,
        seed=3,
        model_channel=None,
        blobs=blobs,
    )
    server = FederatedServer(_mqtt(url, f"server-{run}"), bundle, config)
    stop, agents, threads = threading.Event(), [], []
    try:
        server.start()
        for i, rows in enumerate(data):
            device_id = f"c{i}-{run}"
            transport = _mqtt(
                url,
                device_id,
                will=offline_will(device_id, topics),
                birth=online_birth(device_id, bundle.digest, len(rows), topics),
            )
            agent = Agent(
                AgentConfig(device_id=device_id, topics=topics, seed=10 + i), transport, OrtTrainer.open(bundle), rows
            )
            agent.start()
            agents.append(agent)
            threads.append(threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True))
            threads[-1].start()
        results = server.run()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        for agent in agents:
            agent.close()
        server.close()
    return {k: v.copy() for k, v in server.weights.items()}, results, server


@pytest.fixture(scope="module")
def inline_federation(mosquitto: MosquittoProcess, digits_bundle: Bundle) -> dict[str, np.ndarray]:
    """The reference: the same federation with every update inline on MQTT (no [blobs] table)."""
    weights, results, server = _federation(mosquitto.url, digits_bundle, digits_split(2, seed=4)[0], None)
    assert [r.completed for r in results] == [True, True] and not server.rejections
    return weights


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_federation_by_claim_check_gives_the_inline_model(
    mosquitto: MosquittoProcess,
    moto_s3: MotoS3,
    digits_bundle: Bundle,
    inline_federation: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    table = _blobs_table(backend, tmp_path, moto_s3, monkeypatch)
    weights, results, server = _federation(mosquitto.url, digits_bundle, digits_split(2, seed=4)[0], table)
    assert [(r.completed, r.reported) for r in results] == [(True, 2), (True, 2)], results
    assert not server.rejections, list(server.rejections)
    claims = server.blobs.claims
    assert claims is not None
    assert claims.counters["granted"] == 4 and claims.counters["resolved"] == 4, claims.counters  # every update
    assert claims.counters["refused"] == 0
    assert _stored_keys(table, moto_s3) == []  # each object deleted once its update was accepted
    assert weights.keys() == inline_federation.keys()
    for name, value in weights.items():
        np.testing.assert_allclose(value, inline_federation[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.array_equal(v, digits_bundle.initial_weights()[k]) for k, v in weights.items())  # it trained


# -- a model bundle by claim check ---------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["none", "stale_copy", "corrupted_in_store"])
def test_a_model_bundle_fetched_by_claim_check_is_verified_and_installed(
    mosquitto: MosquittoProcess, digits_bundle: Bundle, tmp_path: Path, fault: str
) -> None:
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"claimota-{run}/v1")
    table = {"backend": "local", "threshold": THRESHOLD, "root": str(tmp_path / "blobs"), "listen_port": 0}
    config = ServerConfig(topics=topics, model_channel=None, blobs=table)
    server = FederatedServer(_mqtt(mosquitto.url, f"server-{run}"), digits_bundle, config)
    v2 = derive_bundle(digits_bundle.directory, tmp_path / "v2", scale=0.5)
    archive = pack_bundle(v2)
    key = content_key(hashlib.sha256(archive).hexdigest(), prefix="bundles")
    corrupt = bytearray(archive)
    corrupt[len(corrupt) // 2] ^= 0xFF
    if fault == "stale_copy":  # an earlier run left a corrupted copy (same size): the server replaces it
        LocalBlobStore(tmp_path / "blobs").put(bytes(corrupt), key=key)
    if fault == "corrupted_in_store":  # the object rots in the store after the server wrote it
        claims_store = server.blobs.claims.store if server.blobs.claims is not None else None
        assert claims_store is not None
        put = claims_store.put

        def put_then_rot(data: bytes, *, key: str | None = None) -> BlobInfo:
            stored = put(data, key=key)
            LocalBlobStore(tmp_path / "blobs").put(bytes(corrupt), key=key)
            return stored

        claims_store.put = put_then_rot  # type: ignore[method-assign,assignment]
    device_id = f"ota-{run}"
    root = tmp_path / device_id
    rows = digits_split(2, seed=4)[0][0]
    validate = evaluation_validator(rows.x, rows.y)
    store = ModelStore(root / "models").open()
    assert store.install_directory(1, digits_bundle.directory, validate=validate).ok
    transport = _mqtt(
        mosquitto.url,
        device_id,
        will=offline_will(device_id, topics),
        birth=online_birth(device_id, digits_bundle.digest, len(rows), topics),
    )
    updater = ModelUpdater(
        device_id,
        topics,
        store,
        DownloadStaging(root / "downloads"),
        validate,
        config=UpdaterConfig(fetch_timeout_s=1.0, max_backoff_s=1.0, max_attempts=2),
    )
    agent = Agent(
        AgentConfig(device_id=device_id, topics=topics, state_dir=root / "state"),
        transport,
        OrtTrainer.open(digits_bundle, lazy=True),
        rows,
        updater=updater,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True)
    models = agent._models
    assert models is not None
    try:
        server.start()
        agent.start()
        thread.start()
        server.wait_for_devices(1, 20)
        server.announce_model(2, v2)
        deadline = time.monotonic() + 40
        while (report := models.last_report) is None and time.monotonic() < deadline:
            server.serve(0.1)
        if fault == "corrupted_in_store":  # let the retry come and fail too
            while updater.pending is not None and time.monotonic() < deadline:
                server.serve(0.1)
    finally:
        stop.set()
        thread.join(timeout=20)
        agent.close()
        server.close()
    claims = server.blobs.claims
    assert claims is not None and claims.counters["models"] >= 1  # answered by reference, not CHUNKs
    assert server.publisher.counters["served"] == 0
    current = store.current()
    assert report is not None and current is not None
    if fault == "corrupted_in_store":  # the device's digest check refuses it
        assert not report.ok and report.stage == "download" and report.code == "blob_integrity", report
        assert current.version == 1 and current.digest == digits_bundle.digest  # nothing installed
        assert updater.pending is None and claims.counters["models"] == 2  # retried once, then given up
        assert not any((root / "downloads").glob("*.claim*"))  # no corrupt bytes kept for a resume
    else:
        assert report.ok and current.version == 2, report
        assert agent.runner.trainer.bundle.digest == current.digest != digits_bundle.digest
        stored = LocalBlobStore(tmp_path / "blobs").get(key)
        assert stored == archive  # a stale corrupted copy was replaced, not served
        assert not any((root / "downloads").glob("*.claim*"))
