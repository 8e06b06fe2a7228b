"""The server's side of claim checks: upload grants with TASKs, references resolved, model links.

* :meth:`ServerClaims.grant` — next to a TASK for a device whose STATUS says
  ``capabilities.claim_check = true`` (:meth:`ServerClaims.wants`): a presigned PUT URL for the
  task's result under a fresh random key, remembered per (device, task) so that a reference can
  only ever name the object the server granted to that device for that task.
* :meth:`ServerClaims.handle` — a device's reference: checks it against the grant, reads the
  object from the store (never through a URL the device chose), verifies size and sha256,
  deletes it, answers a :class:`ClaimAck` and returns the envelope, which the dispatcher then
  handles as if it had arrived inline. A refusal is acked (``retry`` for a transient store
  failure, else ``rejected``: the device then sends the result by MQTT) and raised as
  :class:`ClaimRefused` for the dispatcher's rejection records.
* :meth:`ServerClaims.model_reference` — a FETCH answered by claim check: the bundle archive is
  stored once under its content address and referenced with a presigned GET URL.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from broker_server.blobs import BlobsConfig
from edge_agent.blobs import CAPABILITY, BlobError, BlobNotFound, BlobUnavailable, ClaimCheck, ClaimRefused
from edge_agent.blobs.keys import content_key
from edge_agent.blobs.sigv4 import MAX_PRESIGN_S
from edge_agent.blobs.store import BlobStore
from edge_agent.protocol.claim_messages import (
    CLAIM_COMPLETE,
    CLAIM_REJECTED,
    CLAIM_RETRY,
    KIND_BUNDLE,
    KIND_ENVELOPE,
    ClaimAck,
    ClaimGrant,
    ClaimReference,
)
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.model_messages import model_object_id

__all__ = ["ServerClaims"]

#: grants remembered (oldest forgotten first): far more than tasks outstanding at once
MAX_GRANTS = 100_000


class ServerClaims:
    def __init__(self, store: BlobStore, config: BlobsConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self._clock = clock
        self._check = ClaimCheck(
            store,
            threshold=config.threshold,
            url_lifetime_s=config.url_lifetime_s,
            max_bytes=config.max_object_bytes,
            clock=clock,
        )
        self._grants: OrderedDict[tuple[str, str], ClaimGrant] = OrderedDict()
        #: grants sent, references resolved and refused, model archives referenced (metrics, tests)
        self.counters: Counter[str] = Counter()
        #: bundle keys this process stored or read back whole and hashed (reused without reading)
        self._verified: set[str] = set()

    @staticmethod
    def wants(capabilities: Mapping[str, Any]) -> bool:
        """True for a device that announced it resolves claims (STATUS capabilities)."""
        return capabilities.get(CAPABILITY) is True

    def grant(self, device_id: str, round_: int, task_id: str, deadline_s: float) -> ClaimGrant:
        """A presigned PUT for the result of ``task_id``, valid for the task's deadline at least."""
        lifetime = min(max(self.config.url_lifetime_s, int(deadline_s) + 60), MAX_PRESIGN_S)
        tag = hashlib.sha256(f"{device_id}\0{task_id}".encode()).hexdigest()[:32]
        key = f"updates/{tag}-{secrets.token_hex(8)}"
        grant = ClaimGrant(
            device_id=device_id,
            round=round_,
            task_id=task_id,
            claim_id=f"u-{tag[:16]}-{secrets.token_hex(4)}",
            url=self.store.presign_put(key, lifetime),
            key=key,
            max_size=self.config.max_object_bytes,
            threshold=self.config.threshold,
            expires_at=int(self._clock()) + lifetime,
        )
        self._grants[(device_id, task_id)] = grant
        self.counters["granted"] += 1
        while len(self._grants) > MAX_GRANTS:
            self._grants.popitem(last=False)
        return grant

    def grant_envelope(self, device_id: str, round_: int, task_id: str, deadline_s: float) -> bytes:
        return encode_message(self.grant(device_id, round_, task_id, deadline_s))

    def resolve(self, reference: ClaimReference, device_id: str) -> bytes:
        """The envelope a device's reference names, verified; raises a :class:`BlobError`."""
        grant = self._grants.get((device_id, reference.task_id))
        if reference.kind != KIND_ENVELOPE:
            raise BlobError(f"claim {reference.claim_id}: a device may only send envelopes, not {reference.kind!r}")
        if grant is None or grant.key != reference.key or grant.claim_id != reference.claim_id:
            raise BlobError(f"claim {reference.claim_id}: names no object granted to {device_id} for this task")
        data = self._check.resolve(reference)
        self.store.delete(reference.key)
        self._grants.pop((device_id, reference.task_id), None)
        return data

    def handle(self, reference: ClaimReference, device_id: str, publish: Callable[[bytes], None]) -> bytes:
        """:meth:`resolve` and acknowledge on ``publish`` (the device's tasks topic)."""
        try:
            data = self.resolve(reference, device_id)
        except BlobError as exc:
            status = CLAIM_RETRY if isinstance(exc, BlobUnavailable | BlobNotFound) else CLAIM_REJECTED
            publish(encode_message(_ack(reference, status, f"{exc.code}: {exc.reason}")))
            self.counters["refused"] += 1
            raise ClaimRefused(f"{exc.code}: {exc.reason}") from exc
        publish(encode_message(_ack(reference, CLAIM_COMPLETE, "")))
        self.counters["resolved"] += 1
        return data

    def model_reference(self, device_id: str, version: int, archive: bytes) -> ClaimReference:
        """A reference to bundle ``version``'s archive for ``device_id`` (stored once per content)."""
        digest = hashlib.sha256(archive).hexdigest()
        key = content_key(digest, prefix="bundles")
        if key not in self._verified:
            # an object left by an earlier run is read back once and hashed: a corrupted copy of the
            # same size would otherwise be served again and refused by every device
            try:
                stored = hashlib.sha256(self.store.get(key)).hexdigest() == digest
            except BlobNotFound:
                stored = False
            if not stored:
                self.store.put(archive, key=key)
            self._verified.add(key)
        self.counters["models"] += 1
        return ClaimReference(
            device_id=device_id,
            round=-1,
            task_id=model_object_id(version),
            claim_id=f"m-{digest[:32]}",
            kind=KIND_BUNDLE,
            sha256=digest,
            size=len(archive),
            expires_at=int(self._clock()) + self.config.url_lifetime_s,
            url=self.store.presign_get(key, self.config.url_lifetime_s),
        )


def _ack(reference: ClaimReference, status: str, reason: str) -> ClaimAck:
    return ClaimAck(
        device_id=reference.device_id,
        round=reference.round,
        task_id=reference.task_id,
        claim_id=reference.claim_id,
        status=status,
        reason=reason[:500],
    )
