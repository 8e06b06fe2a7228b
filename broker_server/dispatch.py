"""Inbound messages: from the transport to the registry, the model publisher or the open round.

:class:`Dispatcher` pulls what the transport queued (:meth:`Dispatcher.pump`), checks that each
message comes from the device whose topic it was published on (else ``cross_device``: with the
generated ACL the topic's id is the authenticated MQTT username, so a header naming another
device is a forgery or a mix-up; update binding, :mod:`edge_agent.protocol.binding`), reassembles chunked uploads, and
hands it on: STATUS to the :class:`~broker_server.registry.DeviceRegistry` and to the
:class:`~broker_server.models.ModelPublisher` (a staged rollout folds install reports in), FETCH
to the publisher, UPDATE and ERROR to the round engine's ``on_result``. A CLAIM reference (with
``claims`` set: the server's ``[blobs]`` table) is resolved from the blob store and handled as
the object it carries, checked like a reassembled upload (docs/blobs.md). Every pump also ticks the
publisher (a rollout's soak time). Anything unacceptable (a :class:`ProtocolError`) is logged with its reason and
counted in :attr:`Dispatcher.rejections`; it never stops the server and never disturbs updates
already accepted. Any other error (e.g. a :class:`~edge_agent.errors.StorageError` committing an
update) propagates and stops the server.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from functools import partial

from broker_server.blob_claims import ServerClaims
from broker_server.blob_service import resolve_claim
from broker_server.events import ServerEvents
from broker_server.models import ModelPublisher
from broker_server.registry import DeviceRegistry
from broker_server.server_config import Rejection
from edge_agent.errors import ProtocolError
from edge_agent.protocol.binding import CrossDevice
from edge_agent.protocol.claim_messages import CLAIM_TYPES
from edge_agent.protocol.messages import (
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    FetchMessage,
    StatusMessage,
    UpdateMessage,
    decode_message,
)
from edge_agent.protocol.topics import RESULTS, STATUS, Topics
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import InboundMessage, Transport

__all__ = ["Dispatcher", "ResultHandler"]

log = logging.getLogger("fedflock.server")

#: takes an UPDATE or ERROR; True when an update was counted (not a duplicate); raises
#: ProtocolError for one it cannot accept
ResultHandler = Callable[[UpdateMessage | ErrorMessage], bool]


class Dispatcher:
    #: claim checks (ServerBlobs.attach; None: off): references resolved, model fetches by reference
    claims: ServerClaims | None = None

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        *,
        link: TransferLink,
        registry: DeviceRegistry,
        publisher: ModelPublisher,
        on_result: ResultHandler,
        clock: Callable[[], float],
        events: ServerEvents | None = None,
    ) -> None:
        self.rejections: deque[Rejection] = deque(maxlen=1000)
        self._transport = transport
        self._topics = topics
        self._link = link
        self._registry = registry
        self._publisher = publisher
        self._on_result = on_result
        self._clock = clock
        self._events = events

    def pump(self, timeout: float) -> None:
        """Advance transfers, then handle every queued message (waiting up to ``timeout`` for the first)."""
        self._link.poll()
        self._publisher.tick(self._transport)
        inbound = self._transport.receive(timeout=timeout)
        while inbound is not None:
            self.handle(inbound)
            inbound = self._transport.receive(timeout=0)

    def handle(self, inbound: InboundMessage) -> None:
        """Dispatch one inbound message; anything unacceptable is logged and counted, never raised."""
        device_id = "?"
        try:
            device_id, kind = self._topics.parse(inbound.topic)
            if kind == STATUS and not inbound.payload:
                return  # a cleared retained status
            message = decode_message(inbound.payload)
            if message.device_id != device_id:  # the topic's id is the authenticated one (ACL)
                raise CrossDevice(f"message from {message.device_id!r} published on {device_id!r}'s topic")
            if isinstance(message, ChunkMessage | ChunkAck):
                if kind != RESULTS:
                    raise ProtocolError(f"{type(message).__name__} is not valid on a {kind} topic")
                whole = self._link.handle(message, self._topics.tasks(device_id))
                if whole is None:
                    return
                message = decode_message(whole)
                if isinstance(message, ChunkMessage | ChunkAck):
                    raise ProtocolError(f"reassembled object from {device_id!r} is not one of its results")
                if message.device_id != device_id:
                    raise CrossDevice(f"reassembled object from {device_id!r} names device {message.device_id!r}")
            elif isinstance(message, CLAIM_TYPES) and kind == RESULTS:  # a claim check (docs/blobs.md)
                publish = partial(self._transport.publish, self._topics.tasks(device_id), qos=1)
                if (carried := resolve_claim(self.claims, message, device_id, publish)) is None:
                    return
                message = carried
            self._dispatch(kind, message)
        except ProtocolError as exc:
            self.rejections.append(Rejection(device_id, exc.code, exc.reason))
            if self._events is not None:
                self._events.message_rejected(exc.code)
            log.warning("rejected message from %s on %s (%s): %s", device_id, inbound.topic, exc.code, exc.reason)

    def _dispatch(self, kind: str, message: object) -> None:
        if kind == STATUS and isinstance(message, StatusMessage):
            self._registry.observe(message, self._clock())
            self._publisher.observe(self._transport, message)
        elif kind == RESULTS and isinstance(message, FetchMessage):
            record, claims = self._registry.get(message.device_id), self.claims
            wants = claims is not None and record is not None and claims.wants(record.capabilities)
            self._publisher.handle_fetch(message, self._link, claims=claims if wants else None)
        elif kind == RESULTS and isinstance(message, UpdateMessage | ErrorMessage):
            if self._on_result(message) and isinstance(message, UpdateMessage) and self._events is not None:
                self._events.update_accepted(message.codec, len(message.payload))
        else:
            raise ProtocolError(f"{type(message).__name__} is not valid on a {kind} topic")
