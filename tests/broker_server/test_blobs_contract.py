"""The same BlobStore contract against both backends: the local store (served by its HTTP endpoint)
and S3 (a real moto_server), plus what a device does with presigned URLs: resume, digests."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_server.blob_http import LocalBlobServer
from edge_agent.blobs import (
    BlobAccessDenied,
    BlobIntegrityError,
    BlobNotFound,
    BlobStore,
    Credentials,
    LocalBlobStore,
    download_bytes,
    download_file,
    upload,
)
from edge_agent.errors import ConfigError
from tests.edge_agent.blobs.moto_server import MotoS3


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        secret = os.urandom(32)
        server = LocalBlobServer(LocalBlobStore(tmp_path / "blobs"), secret)
        server.start()
        try:
            yield LocalBlobStore(tmp_path / "blobs", base_url=server.url, secret=secret)
        finally:
            server.close()
    else:
        moto: MotoS3 = request.getfixturevalue("moto_s3")
        yield moto.store(f"contract-{request.node.name.split('[')[0][-30:].replace('_', '-')}", part_size=5 << 20)


def test_put_get_head_delete(store: BlobStore) -> None:
    info = store.put(b"hello blob", key="models/v1/archive.tar")
    assert (info.size, info.sha256) == (10, hashlib.sha256(b"hello blob").hexdigest())
    assert store.get("models/v1/archive.tar") == b"hello blob"
    assert store.head("models/v1/archive.tar") == info
    assert store.open_range("models/v1/archive.tar", 6) == b"blob"
    assert store.open_range("models/v1/archive.tar", 1, 4) == b"ell"
    store.delete("models/v1/archive.tar")
    with pytest.raises(BlobNotFound):
        store.get("models/v1/archive.tar")
    with pytest.raises(BlobNotFound):
        store.head("models/v1/archive.tar")
    store.delete("models/v1/archive.tar")  # deleting a missing key is fine


def test_content_addressed_put_and_overwrite(store: BlobStore) -> None:
    info = store.put(b"same bytes")
    assert info.key.endswith(hashlib.sha256(b"same bytes").hexdigest())
    assert store.put(b"same bytes") == info
    store.put(b"v1", key="k")
    store.put(b"version 2", key="k")
    assert store.get("k") == b"version 2"


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", ".hidden", "a/../b", "a\\b", ""])
def test_unsafe_keys_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ConfigError):
        store.put(b"x", key=key)


def test_streamed_multipart_put(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(11 << 20)  # S3: 3 parts of 5 MiB; local: streamed to disk
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    if hasattr(store, "multipart_threshold"):
        store.multipart_threshold = 5 << 20  # type: ignore[attr-defined]
    with source.open("rb") as handle:
        info = store.put(handle, key="updates/big")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.head("updates/big") == info
    assert store.get("updates/big") == data


def test_presigned_get_and_put(store: BlobStore, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    upload(store.presign_put("up/device-1", 60), payload)
    assert store.get("up/device-1") == payload
    url = store.presign_get("up/device-1", 60)
    digest = hashlib.sha256(payload).hexdigest()
    assert download_bytes(url, size=len(payload), sha256=digest) == payload
    dest = download_file(url, tmp_path / "got.bin", size=len(payload), sha256=digest)
    assert dest.read_bytes() == payload and not (tmp_path / "got.bin.part").exists()


def test_digest_mismatch_is_refused_and_nothing_kept(store: BlobStore, tmp_path: Path) -> None:
    store.put(b"genuine bytes", key="m/x")
    url = store.presign_get("m/x", 60)
    with pytest.raises(BlobIntegrityError):
        download_file(url, tmp_path / "x", size=13, sha256="0" * 64)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()
    with pytest.raises(BlobIntegrityError):  # a longer body than declared is refused as it arrives
        download_bytes(url, size=5, sha256=hashlib.sha256(b"genu").hexdigest(), attempts=1)


def test_missing_object_through_a_url(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        download_bytes(store.presign_get("no/such", 60), size=1, sha256="0" * 64, attempts=1)


class CuttingProxy:
    """A TCP proxy that cuts the first response after ``cut_after`` bytes (a dropped connection)."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port, self.cut_after, self.connections = target_port, cut_after, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(client, limit), daemon=True).start()

    def _pipe(self, client: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=_copy, args=(client, upstream, None), daemon=True).start()
        _copy(upstream, client, limit)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def _copy(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
    sent = 0
    try:
        while data := source.recv(65536):
            if limit is not None and sent + len(data) > limit:
                sink.sendall(data[: limit - sent])
                sink.shutdown(socket.SHUT_RDWR)
                return
            sink.sendall(data)
            sent += len(data)
    except OSError:
        return


def test_ranged_resume_after_a_cut_connection(store: BlobStore, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    store.put(payload, key="resume/me")
    url = store.presign_get("resume/me", 60)
    host_port = url.split("/")[2]
    proxy = CuttingProxy(int(host_port.rsplit(":", 1)[1]), cut_after=1 << 20)
    try:
        through_proxy = url.replace(host_port, f"127.0.0.1:{proxy.port}", 1)
        got = download_file(
            through_proxy,
            tmp_path / "r.bin",
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            sleep=lambda s: None,
        )
    finally:
        proxy.close()
    assert got.read_bytes() == payload
    assert proxy.connections == 2  # the second request asked only for the rest (Range)


def test_local_url_with_a_wrong_signature_or_expired_is_refused(tmp_path: Path) -> None:
    secret, now = os.urandom(32), [1_000_000.0]
    with LocalBlobServer(LocalBlobStore(tmp_path), secret, clock=lambda: now[0]) as server:
        store = LocalBlobStore(tmp_path, base_url=server.url, secret=secret, clock=lambda: now[0])
        store.put(b"secret model", key="m")
        url = store.presign_get("m", 60)
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
        with pytest.raises(BlobAccessDenied):
            download_bytes(tampered, size=12, sha256="0" * 64, attempts=1)
        with pytest.raises(BlobAccessDenied):  # a GET URL does not allow PUT
            upload(url, b"overwrite", attempts=1)
        now[0] += 61
        with pytest.raises(BlobAccessDenied):
            download_bytes(url, size=12, sha256="0" * 64, attempts=1)
        assert store.get("m") == b"secret model"


def test_s3_refuses_a_wrong_signature_with_iam_auth(tmp_path: Path) -> None:
    moto = MotoS3(tmp_path, auth=True)
    moto.start()
    try:
        good = moto.store("signed-bucket")
        good.put(b"x" * 100, key="a/b")
        assert good.get("a/b") == b"x" * 100
        wrong = moto.store("signed-bucket", credentials=Credentials(moto.credentials.access_key, "wrong-secret"))
        with pytest.raises(BlobAccessDenied, match="SignatureDoesNotMatch"):
            wrong.get("a/b")
        unknown = moto.store("signed-bucket", credentials=Credentials("AKIAUNKNOWN000000000", "whatever"))
        with pytest.raises(BlobAccessDenied):
            unknown.put(b"y", key="a/c")
    finally:
        moto.stop()
