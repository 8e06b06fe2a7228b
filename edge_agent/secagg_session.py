"""The agent's secure-aggregation sessions: one per secagg TASK, in memory only (docs/secagg.md).

A TASK with a ``secagg`` object (:class:`~edge_agent.protocol.secagg_messages.SecAggTask`) makes
this device a member of a session. :class:`SecAggSessions` runs the device's side of it while
the agent trains:

1. on the TASK: draw the session's keys and send ``AdvertiseKeys`` at once (:meth:`start`);
2. KeyList -> answer with ``EncryptedShares`` (also while training: the agent pumps SECAGG
   messages at every training step, :meth:`handle`);
3. when training ends (:meth:`trained`): the update (decoded from the UPDATE the task runner
   built) is flattened in manifest order, weighted by ``num_examples / weight_unit`` and
   quantized with the example count appended (:mod:`edge_agent.secagg.weighting`); as soon as
   both it and the ShareBundle are there it is masked and sent as ``MaskedInput``;
4. UnmaskRequest -> ``UnmaskResponse``, once (the client answers an identical retry identically
   and refuses any other request); Abort -> every secret dropped.

**Nothing is persisted.** The keys, the Shamir shares held for peers and the self-mask seed live
only in this object: writing them to disk would leave a file from which, together with the
server's view, this device's masked input could be unmasked later (and the shares it holds for
peers would outlive the session). A restarted agent therefore has no session: it is a dropout,
which the protocol exists to tolerate (its masks are removed with the survivors' key shares,
or the session aborts below the threshold). The agent drops a secagg task whose session it
does not hold (:meth:`holds`).

Every failure is a :class:`~edge_agent.errors.FedflockError` for the caller to log; it ends at
most this device's part in that one session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.codecs import decode_update
from edge_agent.errors import ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import TaskMessage, UpdateMessage
from edge_agent.protocol.secagg_messages import (
    FFSA_HEADER_BYTES,
    SecAggMessage,
    SecAggTask,
    check_size,
)

if TYPE_CHECKING:
    from edge_agent.secagg import SecAggClient, ShareBundle
    from edge_agent.secagg.crypto import RandomSource

log = logging.getLogger("fedflock.agent")

#: ``(message) -> None``: publish a small SECAGG message on the device's results topic
Publish = Callable[[SecAggMessage], None]
#: ``(envelope, round, task_id) -> "done" | "failed: ..."``: send a possibly chunked envelope
SendLarge = Callable[[SecAggMessage], str]
#: Abort reasons are at most 1 KiB; the longest server message is a ShareBundle of 158-byte entries
_SLACK = 1024 + 16


@dataclass(eq=False)
class _Session:
    task: SecAggTask
    round: int
    task_id: str
    client: SecAggClient
    expires_at: float
    bundle: ShareBundle | None = None
    vector: np.ndarray | None = None
    masked: bool = False

    @property
    def inbound_limit(self) -> int:
        """The largest server -> device FFSA message this session can see (a ShareBundle or an Abort)."""
        return FFSA_HEADER_BYTES + 4 + 158 * self.task.cohort + _SLACK


class SecAggSessions:
    """This device's open sessions, by task id. Not thread-safe: the agent's thread drives it."""

    def __init__(
        self,
        device_id: str,
        specs: Callable[[], Sequence[TensorSpec]],
        *,
        publish: Publish,
        send_large: SendLarge,
        rng: np.random.Generator,
        wall_clock: Callable[[], float],
        keys_rng: RandomSource | None = None,
    ) -> None:
        """``specs``: the current model's aggregated tensors (the update's order); ``rng`` draws the
        quantizer's rounding; ``keys_rng`` the session keys (default: the OS's CSPRNG)."""
        self._device_id = device_id
        self._specs = specs
        self._publish = publish
        self._send_large = send_large
        self._rng = rng
        self._wall_clock = wall_clock
        self._keys_rng = keys_rng
        self._sessions: dict[str, _Session] = {}

    @property
    def active(self) -> bool:
        return bool(self._sessions)

    def holds(self, task_id: str) -> bool:
        return task_id in self._sessions

    # -- the TASK ----------------------------------------------------------------------------------
    def start(self, task: TaskMessage) -> None:
        """Join the session of a secagg ``task`` and advertise its keys (a repeated TASK repeats them)."""
        from edge_agent.secagg import RingSpec, SecAggClient, SecAggParams, encode
        from edge_agent.secagg.weighting import session_length

        fields = task.secagg
        if fields is None:
            return
        session = self._sessions.get(task.task_id)
        if session is None:
            spec = RingSpec(clip=fields.clip, quant_bits=fields.quant_bits, ring_bits=fields.ring_bits)
            size = sum(int(np.prod(t.shape)) for t in self._specs())
            if fields.length != session_length(size, spec):
                raise ContractViolation(
                    f"secagg length {fields.length} does not fit this model ({size} values + count words)"
                )
            params = SecAggParams(
                session=fields.session,
                cohort=fields.cohort,
                threshold=fields.threshold,
                length=fields.length,
                ring=spec,
            )
            client = SecAggClient(params, fields.index, rng=self._keys_rng)
            expires = self._wall_clock() + task.deadline_s
            session = _Session(fields, task.round, task.task_id, client, expires)
            self._sessions[task.task_id] = session
        if session.client.phase in ("new", "advertised"):
            self._publish(self._wrap(session, encode(session.client.advertise())))

    # -- server messages ---------------------------------------------------------------------------
    def handle(self, message: SecAggMessage) -> None:
        """One server message of an open session; ContractViolation for an unknown or oversize one."""
        from edge_agent.secagg import Abort, KeyList, ShareBundle, UnmaskRequest, decode, encode

        session = self._sessions.get(message.task_id)
        if session is None or session.task.session != message.session:
            raise ContractViolation(f"SECAGG {message.kind_name} for an unknown session (task {message.task_id!r})")
        check_size(message, session.inbound_limit)
        decoded = decode(message.payload)
        client = session.client
        if isinstance(decoded, KeyList):
            self._publish(self._wrap(session, encode(client.share_keys(decoded))))
        elif isinstance(decoded, ShareBundle):
            session.bundle = decoded
            self._mask_when_ready(session)
        elif isinstance(decoded, UnmaskRequest):
            self._publish(self._wrap(session, encode(client.unmask(decoded))))
            log.info("%s: secagg session of task %s: unmasking shares sent", self._device_id, session.task_id)
        elif isinstance(decoded, Abort):
            log.warning("%s: secagg session of task %s aborted: %s", self._device_id, session.task_id, decoded.reason)
            self.drop(session.task_id)
        else:
            raise ContractViolation(f"SECAGG {message.kind_name} is not a server -> device message")

    # -- the trained update ------------------------------------------------------------------------
    def trained(self, update: UpdateMessage) -> None:
        """The task's training result: weight, quantize and (once the ShareBundle is in) mask it."""
        from edge_agent.secagg import RingSpec
        from edge_agent.secagg.weighting import encode_weighted, flatten

        session = self._sessions.get(update.task_id)
        if session is None:
            raise ContractViolation(f"no secagg session for task {update.task_id!r} (the agent restarted)")
        fields = session.task
        specs = self._specs()
        delta = decode_update(update.payload, {t.name: tuple(t.shape) for t in specs})
        spec = RingSpec(clip=fields.clip, quant_bits=fields.quant_bits, ring_bits=fields.ring_bits)
        vector = flatten(delta, specs)
        session.vector = encode_weighted(vector, update.num_examples, fields.weight_unit, spec, self._rng)
        self._mask_when_ready(session)

    def _mask_when_ready(self, session: _Session) -> None:
        from edge_agent.secagg import encode

        if session.masked or session.bundle is None or session.vector is None:
            return
        masked = session.client.mask(session.bundle, session.vector)
        session.masked, session.vector = True, None
        outcome = self._send_large(self._wrap(session, encode(masked)))
        if outcome != "done":
            log.warning("%s: masked input of task %s not delivered: %s", self._device_id, session.task_id, outcome)
        else:
            log.info("%s: secagg session of task %s: masked input sent", self._device_id, session.task_id)

    # -- the end -----------------------------------------------------------------------------------
    def drop(self, task_id: str) -> None:
        """End this device's part in the session of ``task_id``: every secret is forgotten."""
        session = self._sessions.pop(task_id, None)
        if session is not None:
            session.client.abort()

    def purge(self, now: float) -> None:
        """Forget sessions whose task deadline passed (answered or not)."""
        for task_id in [t for t, s in self._sessions.items() if now >= s.expires_at]:
            self.drop(task_id)

    def _wrap(self, session: _Session, payload: bytes) -> SecAggMessage:
        return SecAggMessage(
            device_id=self._device_id,
            round=session.round,
            task_id=session.task_id,
            session=session.task.session,
            payload=payload,
        )
