"""Claim check: above a size threshold an object goes to a blob store and MQTT carries a reference.

:func:`should_claim_check` is the whole decision (pure). :class:`ClaimCheck` is the party that
holds a store (the server): :meth:`~ClaimCheck.outbound` returns the payload inline or stores it
(content-addressed: the same model archive is uploaded once) and returns a
:class:`~edge_agent.protocol.claim_messages.ClaimReference` with a presigned GET URL;
:meth:`~ClaimCheck.resolve` turns a reference back into bytes, refusing, before it fetches
anything, one above ``max_bytes`` (:class:`BlobTooLarge`) or past its expiry
(:class:`ClaimExpired`), and afterwards any whose size or sha256 differs
(:class:`BlobIntegrityError`). :func:`resolve_url` does the same for a party without a store (a
device), through the URL only. Nothing is lost on a failure: the sender keeps its copy until the
receiver acknowledges ``complete`` (:mod:`edge_agent.protocol.claim_messages`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.blobs.errors import BlobError, BlobIntegrityError, BlobTooLarge, ClaimExpired
from edge_agent.blobs.http import HttpClient
from edge_agent.blobs.keys import content_key
from edge_agent.blobs.store import BlobStore
from edge_agent.blobs.urls import download_bytes
from edge_agent.protocol.claim_messages import KIND_ENVELOPE, ClaimReference

__all__ = ["ClaimCheck", "Inline", "check_reference", "resolve_url", "should_claim_check"]


def should_claim_check(size: int, threshold: int) -> bool:
    """True when an object of ``size`` bytes should travel by claim check (``threshold`` 0: never)."""
    return threshold > 0 and size > threshold


@dataclass(frozen=True)
class Inline:
    """:meth:`ClaimCheck.outbound`'s answer for an object small enough to send as it is."""

    payload: bytes


def check_reference(reference: ClaimReference, *, max_bytes: int, now: float) -> None:
    """The checks made before fetching: size within ``max_bytes`` and not expired."""
    if reference.size > max_bytes:
        raise BlobTooLarge(f"claim {reference.claim_id}: {reference.size} bytes exceeds the limit of {max_bytes}")
    if now > reference.expires_at:
        raise ClaimExpired(f"claim {reference.claim_id}: expired at {reference.expires_at} (now {int(now)})")


def _verify(reference: ClaimReference, data: bytes) -> bytes:
    if len(data) != reference.size:
        raise BlobIntegrityError(f"claim {reference.claim_id}: {len(data)} bytes, the reference says {reference.size}")
    if hashlib.sha256(data).hexdigest() != reference.sha256:
        raise BlobIntegrityError(f"claim {reference.claim_id}: the object's sha256 does not match the reference")
    return data


def resolve_url(
    reference: ClaimReference,
    *,
    max_bytes: int,
    clock: Callable[[], float] = time.time,
    http: HttpClient | None = None,
) -> bytes:
    """Fetch a reference through its URL (with resume) and verify it."""
    check_reference(reference, max_bytes=max_bytes, now=clock())
    if not reference.url:
        raise BlobError(f"claim {reference.claim_id} names only a store key, and this receiver has no store")
    data = download_bytes(reference.url, size=reference.size, sha256=reference.sha256, http=http)
    return _verify(reference, data)


class ClaimCheck:
    """The claim-check policy of a party holding ``store`` (wall ``clock`` in Unix seconds)."""

    def __init__(
        self,
        store: BlobStore,
        *,
        threshold: int,
        url_lifetime_s: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        http: HttpClient | None = None,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.url_lifetime_s = url_lifetime_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._http = http

    def outbound(
        self, payload: bytes, *, device_id: str, round: int, task_id: str, kind: str = KIND_ENVELOPE
    ) -> ClaimReference | Inline:
        """``payload`` inline, or stored under its content address and referenced."""
        if not should_claim_check(len(payload), self.threshold):
            return Inline(payload)
        digest = hashlib.sha256(payload).hexdigest()
        info = self.store.put(payload, key=content_key(digest, prefix="claims"))
        expires_at = int(self._clock()) + self.url_lifetime_s
        return ClaimReference(
            device_id=device_id,
            round=round,
            task_id=task_id,
            claim_id=f"c-{digest[:32]}",
            kind=kind,
            sha256=digest,
            size=info.size,
            expires_at=expires_at,
            url=self.store.presign_get(info.key, self.url_lifetime_s),
            key=info.key,
        )

    def resolve(self, reference: ClaimReference) -> bytes:
        """The referenced bytes, verified; read from the store by ``key`` when it has one."""
        if not reference.key:
            return resolve_url(reference, max_bytes=self.max_bytes, clock=self._clock, http=self._http)
        check_reference(reference, max_bytes=self.max_bytes, now=self._clock())
        info = self.store.head(reference.key)
        if info.size != reference.size:
            raise BlobIntegrityError(f"claim {reference.claim_id}: stored {info.size} bytes, not {reference.size}")
        return _verify(reference, self.store.get(reference.key))
