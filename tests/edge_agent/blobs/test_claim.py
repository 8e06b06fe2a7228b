"""CLAIM messages on the wire, the claim-check decision, ClaimCheck and the device's ClaimUploads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_agent.blobs import (
    BlobIntegrityError,
    BlobTooLarge,
    ClaimCheck,
    ClaimExpired,
    Inline,
    LocalBlobStore,
    should_claim_check,
)
from edge_agent.errors import MalformedMessage
from edge_agent.protocol.claim_messages import ClaimAck, ClaimGrant, ClaimReference
from edge_agent.protocol.messages import decode_message, encode_message

SHA = "ab" * 32


@pytest.mark.parametrize(
    "message",
    [
        ClaimGrant(
            device_id="d1",
            round=3,
            task_id="t-1",
            claim_id="u-1",
            url="https://s3.example/b/k?X=1",
            key="updates/k",
            max_size=10**9,
            threshold=8 << 20,
            expires_at=1_700_000_000,
        ),
        ClaimReference(
            device_id="d1",
            round=3,
            task_id="t-1",
            claim_id="u-1",
            kind="envelope",
            sha256=SHA,
            size=123,
            expires_at=1_700_000_000,
            key="updates/k",
        ),
        ClaimReference(
            device_id="d1",
            round=-1,
            task_id="model-v2",
            claim_id="m-1",
            kind="bundle-archive",
            sha256=SHA,
            size=5,
            expires_at=9,
            url="http://h:1/bundles/x?expires=9&signature=aa",
        ),
        ClaimAck(device_id="d1", round=3, task_id="t-1", claim_id="u-1", status="rejected", reason="blob_integrity"),
    ],
)
def test_claim_messages_round_trip(message: object) -> None:
    assert decode_message(encode_message(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("op", "steal"),
        ("kind", "pickle"),
        ("sha256", "XY"),
        ("size", 0),
        ("key", "../etc"),
        ("url", "file:///etc"),
        ("claim_id", "a b"),
    ],
)
def test_malformed_references_are_refused(field: str, value: object) -> None:
    ref = ClaimReference(
        device_id="d1",
        round=1,
        task_id="t",
        claim_id="c",
        kind="envelope",
        sha256=SHA,
        size=1,
        expires_at=1,
        url="https://x/y",
        key="k",
    )
    raw = encode_message(ref)
    header = raw[12:].decode()
    import json

    parsed = json.loads(header)
    parsed[field] = value
    body = json.dumps(parsed).encode()
    with pytest.raises(MalformedMessage):
        decode_message(raw[:8] + len(body).to_bytes(4, "little") + body)


def test_reference_needs_url_or_key() -> None:
    ref = ClaimReference(
        device_id="d1", round=1, task_id="t", claim_id="c", kind="envelope", sha256=SHA, size=1, expires_at=1
    )
    with pytest.raises(MalformedMessage, match="neither"):
        decode_message(encode_message(ref))


def test_should_claim_check() -> None:
    assert should_claim_check(101, 100) and not should_claim_check(100, 100)
    assert not should_claim_check(10**12, 0)  # threshold 0: never


def _check(tmp_path: Path, now: list[float], **kwargs: int) -> ClaimCheck:
    return ClaimCheck(
        LocalBlobStore(tmp_path, base_url="http://127.0.0.1:1", secret=b"s", clock=lambda: now[0]),
        threshold=kwargs.get("threshold", 100),
        url_lifetime_s=60,
        max_bytes=kwargs.get("max_bytes", 10_000),
        clock=lambda: now[0],
    )


def test_claim_check_inline_and_by_reference(tmp_path: Path) -> None:
    now = [1000.0]
    check = _check(tmp_path, now)
    assert check.outbound(b"x" * 100, device_id="d1", round=1, task_id="t") == Inline(b"x" * 100)
    payload = os.urandom(5000)
    ref = check.outbound(payload, device_id="d1", round=1, task_id="t")
    assert isinstance(ref, ClaimReference)
    assert (ref.size, ref.sha256, ref.expires_at) == (5000, hashlib.sha256(payload).hexdigest(), 1060)
    assert "signature=" in ref.url
    assert check.resolve(ref) == payload


def test_claim_check_refusals(tmp_path: Path) -> None:
    now = [1000.0]
    check = _check(tmp_path, now, max_bytes=4000)
    big = _check(tmp_path, now).outbound(os.urandom(5000), device_id="d1", round=1, task_id="t")
    assert isinstance(big, ClaimReference)
    with pytest.raises(BlobTooLarge):  # refused before anything is read
        check.resolve(big)
    small = check.outbound(os.urandom(3000), device_id="d1", round=1, task_id="t")
    assert isinstance(small, ClaimReference)
    check.store.put(os.urandom(3000), key=small.key)  # the object changed behind the reference
    with pytest.raises(BlobIntegrityError):
        check.resolve(small)
    now[0] += 61
    with pytest.raises(ClaimExpired):
        check.resolve(small)
