"""The device's side of claim-checked uploads: grant -> PUT -> reference -> wait for the ack.

The server sends a :class:`ClaimGrant` next to a TASK (to devices whose STATUS capabilities say
``claim_check: true``). When the result of that task is larger than the grant's ``threshold``,
:meth:`ClaimUploads.send` PUTs the envelope to the grant's presigned URL, publishes a
:class:`ClaimReference` (key, sha256, size) on the device's ``results`` topic and pumps the
inbound queue until the server's :class:`ClaimAck` names it. Outcomes, in the vocabulary of
:data:`edge_agent.uploads.SendEnvelope`:

* ``None`` — use the normal route (inline or chunked MQTT): no grant, below the threshold, above
  ``max_size``, an expired grant, the URL refused (403) or the server rejected the reference
  for good (the grant is dropped so the retry goes by MQTT);
* ``"done"`` — the server acknowledged ``complete``: the outbox may drop the result;
* ``"failed: <reason>"`` — store unreachable, no ack in time, or ``retry``: the outbox keeps the
  result and the uploader backs off (the grant is kept).

Grants live in memory (at most ``max_grants``, oldest dropped): after a restart a result goes by
MQTT. Pure of MQTT except through the injected ``publish`` and ``pump``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeGuard

from edge_agent.blobs.errors import BlobAccessDenied, BlobError, BlobTooLarge, BlobUnavailable
from edge_agent.blobs.http import HttpClient
from edge_agent.blobs.urls import upload
from edge_agent.protocol.claim_messages import (
    CLAIM_COMPLETE,
    CLAIM_REJECTED,
    KIND_ENVELOPE,
    ClaimAck,
    ClaimGrant,
    ClaimMessage,
    ClaimReference,
)

__all__ = ["CAPABILITY", "ClaimUploads"]

log = logging.getLogger("fedflock.agent")

#: the STATUS ``capabilities`` key a device sets (true) when it resolves claims
CAPABILITY = "claim_check"
#: a grant this close to its expiry is not used (the PUT and the server's GET must fit before it)
EXPIRY_MARGIN_S = 30.0


class ClaimUploads:
    def __init__(
        self,
        device_id: str,
        publish: Callable[[bytes], None],
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        http: HttpClient | None = None,
        ack_timeout_s: float = 120.0,
        max_grants: int = 64,
    ) -> None:
        """``publish`` sends an envelope on the device's results topic (QoS 1)."""
        self._device_id = device_id
        self._publish = publish
        self._wall_clock = wall_clock
        self._clock = clock
        self._http = http or HttpClient()
        self._ack_timeout_s = ack_timeout_s
        self._max_grants = max_grants
        self._grants: OrderedDict[str, ClaimGrant] = OrderedDict()
        self._acks: dict[str, ClaimAck] = {}

    def accepts(self, message: object) -> TypeGuard[ClaimGrant | ClaimAck]:
        """True for a grant or ack addressed to this device (route it to :meth:`handle`)."""
        return isinstance(message, ClaimGrant | ClaimAck) and message.device_id == self._device_id

    def handle(self, message: ClaimMessage) -> None:
        if isinstance(message, ClaimGrant):
            self._grants[message.task_id] = message
            self._grants.move_to_end(message.task_id)
            while len(self._grants) > self._max_grants:
                self._grants.popitem(last=False)
        elif isinstance(message, ClaimAck):
            self._acks[message.claim_id] = message

    def grant(self, task_id: str) -> ClaimGrant | None:
        return self._grants.get(task_id)

    def send(self, envelope: bytes, round_: int, task_id: str, pump: Callable[[float], None]) -> str | None:
        """Upload ``envelope`` by claim check if a usable grant exists (see the module docstring)."""
        grant = self._usable_grant(task_id, len(envelope))
        if grant is None:
            return None
        try:
            upload(grant.url, envelope, http=self._http)
        except BlobUnavailable as exc:
            return f"failed: blob store unreachable: {exc.reason}"
        except (BlobAccessDenied, BlobTooLarge) as exc:
            log.warning("%s: grant for task %s refused (%s); sending by MQTT", self._device_id, task_id, exc.reason)
            self._grants.pop(task_id, None)
            return None
        except BlobError as exc:
            return f"failed: {exc.code}: {exc.reason}"
        self._acks.pop(grant.claim_id, None)
        self._publish_reference(grant, round_, task_id, envelope)
        ack = self._wait_for_ack(grant.claim_id, pump)
        if ack is None:
            return "failed: no acknowledgement of the claim check"
        if ack.status == CLAIM_COMPLETE:
            self._grants.pop(task_id, None)
            return "done"
        if ack.status == CLAIM_REJECTED:
            log.warning("%s: claim for task %s rejected (%s); sending by MQTT", self._device_id, task_id, ack.reason)
            self._grants.pop(task_id, None)
            return None
        return f"failed: server asked to retry the claim: {ack.reason}"

    def _usable_grant(self, task_id: str, size: int) -> ClaimGrant | None:
        grant = self._grants.get(task_id)
        if grant is None or not size > grant.threshold or size > grant.max_size:
            return None
        if self._wall_clock() + EXPIRY_MARGIN_S >= grant.expires_at:
            self._grants.pop(task_id, None)
            return None
        return grant

    def _publish_reference(self, grant: ClaimGrant, round_: int, task_id: str, envelope: bytes) -> None:
        reference = ClaimReference(
            device_id=self._device_id,
            round=round_,
            task_id=task_id,
            claim_id=grant.claim_id,
            kind=KIND_ENVELOPE,
            sha256=hashlib.sha256(envelope).hexdigest(),
            size=len(envelope),
            expires_at=grant.expires_at,
            key=grant.key,
        )
        from edge_agent.protocol.messages import encode_message  # messages imports claim_messages, not us

        self._publish(encode_message(reference))

    def _wait_for_ack(self, claim_id: str, pump: Callable[[float], None]) -> ClaimAck | None:
        deadline = self._clock() + self._ack_timeout_s
        while claim_id not in self._acks:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            pump(min(0.5, remaining))
        return self._acks.pop(claim_id)
