"""The agent's messaging half: eligibility reports, result sends, pumps while it uploads or trains.

Split off :mod:`edge_agent.agent` (whose :class:`~edge_agent.agent.Agent` inherits
:class:`AgentIO`) to keep that module small. Secure aggregation's messages are handled here:
SECAGG envelopes go to the agent's :class:`~edge_agent.secagg_session.SecAggSessions`, also
*while it trains* (:meth:`AgentIO._pump_secagg`, called at every training step), so a device
answers the key list and receives its share bundle without waiting for its training to end.
A result larger than the server's claim-check threshold leaves by the upload grant that came
with its TASK (:class:`~edge_agent.blobs.ClaimUploads`, docs/blobs.md); without a usable grant
it goes by MQTT as before.
"""

from __future__ import annotations

import logging
from collections import deque

from edge_agent.agent_config import AgentConfig
from edge_agent.blobs import ClaimUploads
from edge_agent.device.eligibility import Decision
from edge_agent.errors import FedflockError, ProtocolError
from edge_agent.model_updates import ModelUpdates
from edge_agent.protocol.messages import ChunkAck, ChunkMessage, SecAggMessage, decode_message, encode_message
from edge_agent.secagg_session import SecAggSessions
from edge_agent.transfer import TransferLink
from edge_agent.transport.base import Transport

log = logging.getLogger("fedflock.agent")

#: How long one chunked upload may wait for the server's acknowledgements before it is retried
UPLOAD_TIMEOUT_S = 120.0


class AgentIO:
    """Messaging for :class:`~edge_agent.agent.Agent`; the agent owns the attributes declared here."""

    config: AgentConfig
    secagg: SecAggSessions
    _transport: Transport
    _link: TransferLink
    _claims: ClaimUploads
    _deferred: deque[bytes]
    _models: ModelUpdates | None
    _chunk_limits: dict[str, int]
    _reported: dict[str, tuple[bool, tuple[str, ...]]]

    def _publish_status(self, *, online: bool, decision: Decision | None = None) -> None: ...  # the agent's

    def _report(self, decision: Decision) -> None:
        """Publish the eligibility decision in STATUS when it changed (reasons go to the server)."""
        key, group = (decision.eligible, decision.codes), "train" if decision.phase == "continue" else decision.phase
        if self._reported.get(group) == key:
            return
        self._reported[group] = key
        if not decision.eligible:
            log.info("%s: %s: %s", self.config.device_id, decision.phase, decision)
        try:
            self._publish_status(online=True, decision=decision)
        except FedflockError as exc:
            log.debug("%s: could not publish eligibility: %s", self.config.device_id, exc)

    def _publish_result(self, envelope: bytes) -> None:
        self._transport.publish(self.config.topics.results(self.config.device_id), envelope, qos=1)

    def _send_envelope(self, envelope: bytes, round_: int, task_id: str) -> str:
        """Publish a result: by claim check when the task's grant covers it, else inline, or as
        acknowledged CHUNKs when larger than the chunk size."""
        if (outcome := self._claims.send(envelope, round_, task_id, self._pump_during_upload)) is not None:
            return outcome
        topic = self.config.topics.results(self.config.device_id)
        chunk_bytes = min(self.config.chunk_bytes, self._chunk_limits.get(task_id) or self.config.chunk_bytes)
        if len(envelope) <= chunk_bytes:
            self._transport.publish(topic, envelope, qos=1)
            return "done"
        transfer = self._link.send(
            topic, envelope, device_id=self.config.device_id, round=round_, task_id=task_id, chunk_size=chunk_bytes
        )
        self._link.wait(transfer, self._pump_during_upload, timeout_s=UPLOAD_TIMEOUT_S)
        state = self._link.state(transfer)
        self._link.forget(transfer)
        return state

    def _pump_during_upload(self, timeout: float) -> None:
        """Route acknowledgements (and chunks of a download) while an upload runs; keep the rest."""
        inbound = self._transport.receive(timeout=timeout)
        if inbound is None:
            return
        try:
            message = decode_message(inbound.payload)
        except ProtocolError:
            self._deferred.append(inbound.payload)  # handle_payload logs it in order
            return
        if self._models is not None and self._models.accepts(message):
            self._models.handle(message)  # model chunks are acknowledged as they arrive
        elif self._claims.accepts(message):
            self._claims.handle(message)  # grants, and the ack a claim-checked upload waits for
        elif isinstance(message, ChunkMessage | ChunkAck) and message.device_id == self.config.device_id:
            whole = self._link.handle(message, self.config.topics.results(self.config.device_id))
            if whole is not None:
                self._deferred.append(whole)
        else:
            self._deferred.append(inbound.payload)

    # -- secure aggregation -------------------------------------------------------------------------
    def _handle_secagg(self, message: SecAggMessage) -> None:
        """A SECAGG message for this device; a refused one is logged (it ends at most its session)."""
        try:
            self.secagg.handle(message)
        except FedflockError as exc:
            log.warning(
                "%s: refused SECAGG %s of task %s (%s): %s",
                self.config.device_id,
                message.kind_name,
                message.task_id,
                exc.code,
                exc.reason,
            )

    def _publish_secagg(self, message: SecAggMessage) -> None:
        topic = self.config.topics.results(self.config.device_id)
        self._transport.publish(topic, encode_message(message), qos=1)

    def _send_secagg(self, message: SecAggMessage) -> str:
        return self._send_envelope(encode_message(message), message.round, message.task_id)

    def _pump_secagg(self) -> None:
        """While training: handle queued SECAGG messages now, keep every other message for later."""
        if not self.secagg.active:
            return
        while (inbound := self._transport.receive(timeout=0)) is not None:
            try:
                message = decode_message(inbound.payload)
            except ProtocolError:
                self._deferred.append(inbound.payload)  # handle_payload logs it in order
                continue
            if isinstance(message, SecAggMessage) and message.device_id == self.config.device_id:
                self._handle_secagg(message)
            else:
                self._deferred.append(inbound.payload)
