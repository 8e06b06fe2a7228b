"""The server's blob store wired in: claims for the round engine, the dispatcher and model fetches.

:class:`ServerBlobs` is what :class:`~broker_server.server.FederatedServer` holds for its
``blobs`` table (docs/blobs.md): the store (:func:`~broker_server.blobs.open_blob_store`), the
:class:`~broker_server.blob_claims.ServerClaims` policy and, for the local backend, the
:class:`~broker_server.blob_http.LocalBlobServer` that devices GET and PUT through (started with
the server, closed with it; without ``public_url`` devices get the URL it listens on).
:meth:`ServerBlobs.attach` hands the claims to the parts that use them — the round engine (a
grant next to each TASK, :func:`send_grant`), the dispatcher (references resolved,
:func:`resolve_claim`) — and the dispatcher passes them to the model publisher for a FETCH.
Without a ``blobs`` table nothing changes: ``claims`` is None everywhere and all goes by MQTT.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from broker_server.blob_claims import ServerClaims
from broker_server.blob_http import LocalBlobServer
from broker_server.blobs import BlobsConfig, open_blob_store
from broker_server.registry import DeviceRegistry
from edge_agent.blobs import BlobStore, LocalBlobStore
from edge_agent.errors import ProtocolError
from edge_agent.protocol.binding import CrossDevice
from edge_agent.protocol.claim_messages import ClaimAck, ClaimGrant, ClaimMessage, ClaimReference
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, Message, TaskMessage, decode_message
from edge_agent.transport.base import Transport

__all__ = ["ServerBlobs", "resolve_claim", "send_grant"]

log = logging.getLogger("fedflock.server")


class _UsesClaims(Protocol):
    claims: ServerClaims | None


class ServerBlobs:
    """The store, claims and (local backend) HTTP endpoint of one server; no I/O until :meth:`start`.

    ``config`` None: off (``claims`` None, :meth:`start` and :meth:`close` do nothing).
    """

    def __init__(
        self,
        config: BlobsConfig | None,
        env: Mapping[str, str] = os.environ,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.http: LocalBlobServer | None = None
        self.claims: ServerClaims | None = None
        self._local: LocalBlobStore | None = None
        if config is None:
            return
        if config.backend == "local":
            secret = env.get(config.secret_env, "").encode() or secrets.token_bytes(32)
            self._local = LocalBlobStore(
                config.root, base_url=config.public_url, secret=secret, clock=clock, max_bytes=config.max_object_bytes
            )
            self.http = LocalBlobServer(
                self._local,
                secret,
                host=config.listen_host,
                port=config.listen_port,
                max_put_bytes=config.max_object_bytes,
                clock=clock,
            )
            store: BlobStore = self._local
        else:
            store = open_blob_store(config, env, clock=clock)  # ConfigError naming an unset credential
        self.claims = ServerClaims(store, config, clock=clock)

    @classmethod
    def attach(cls, config: BlobsConfig | None, *parts: _UsesClaims) -> ServerBlobs:
        """The blobs of ``config`` (None: off), their claims set on every part (engine, dispatcher)."""
        blobs = cls(config)
        for part in parts:
            part.claims = blobs.claims
        return blobs

    def start(self) -> None:
        """Start the local backend's HTTP endpoint (ConfigError if its port is taken)."""
        if self.http is None or self._local is None:
            return
        self.http.start()
        if not self._local.base_url:
            self._local.base_url = self.http.url
        log.info("blob store: serving %s on %s", self._local.root, self._local.base_url)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()


def send_grant(
    claims: ServerClaims | None, registry: DeviceRegistry, transport: Transport, topic: str, task: TaskMessage
) -> bool:
    """Publish an upload grant for ``task`` on ``topic`` if claims are on and its device takes them.

    Sent just *before* the TASK (same topic, QoS 1: it arrives first), so the device holds the
    grant when its result is ready even if it trains as soon as the TASK arrives.
    """
    record = registry.get(task.device_id) if claims is not None else None
    if claims is None or record is None or not claims.wants(record.capabilities):
        return False
    grant = claims.grant_envelope(task.device_id, task.round, task.task_id, task.deadline_s)
    transport.publish(topic, grant, qos=1)
    return True


def resolve_claim(
    claims: ServerClaims | None, message: ClaimMessage, device_id: str, publish: Callable[[bytes], None]
) -> Message | None:
    """A device's CLAIM on its ``results`` topic: the message a reference carries (decoded and
    checked like a reassembled upload), None for an ack (of a model reference: nothing to do).

    Raises :class:`ProtocolError` (``ClaimRefused`` among them: the device was acked why) for a
    grant from a device, a reference while claim checks are off, or one that does not resolve;
    the carried object must not be a CHUNK or CLAIM and must name the same device (``CrossDevice``).
    """
    if isinstance(message, ClaimAck):
        log.debug("%s acknowledged claim %s: %s %s", device_id, message.claim_id, message.status, message.reason)
        return None
    if isinstance(message, ClaimGrant):
        raise ProtocolError("a device does not send upload grants")
    if claims is None:
        raise ProtocolError("claim checks are off on this server (no [blobs] table)")
    assert isinstance(message, ClaimReference)
    carried = decode_message(claims.handle(message, device_id, publish))
    if isinstance(carried, ChunkMessage | ChunkAck | ClaimReference | ClaimGrant | ClaimAck):
        raise ProtocolError(f"claim-checked object from {device_id!r} is not one of its results")
    if carried.device_id != device_id:
        raise CrossDevice(f"claim-checked object from {device_id!r} names device {carried.device_id!r}")
    return carried
