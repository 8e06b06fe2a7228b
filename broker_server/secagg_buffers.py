"""Secure aggregation per FedBuff buffer: one session per buffer, several open at once (docs/secagg.md).

A buffer's session (:class:`BufferSession`) is the sync round's session (:mod:`broker_server.secagg_round`)
made non-blocking: the asynchronous engine's loop calls :meth:`BufferSessions.step` between pumps,
and every open session closes its current phase when every expected device answered or at the
phase's deadline (on the injected clock):

====== ================================================ =============================================
phase  expected                                         deadline
====== ================================================ =============================================
keys   the cohort (minus devices whose task failed)     opened + ``keys_timeout_s``
shares ``U1``, who got the KeyList                      then + ``shares_timeout_s``
masked ``U2``, who got a ShareBundle                    the tasks' deadline (opened + ``task_timeout_s``)
unmask ``U3``, the survivors                            then + ``unmask_timeout_s``
====== ================================================ =============================================

(keys and shares are also cut at the tasks' deadline). A phase that closes with fewer than ``t``
devices, shares that do not rebuild, a sum whose masks did not cancel, or a cohort whose base
version fell more than ``max_staleness`` behind **aborts** the session: an Abort goes to every
member and the result is an :class:`AbortedSession` (nothing was revealed; the buffer is
abandoned). A completed session is a :class:`SealedSession`: the example-weighted mean of the
survivors (:mod:`edge_agent.secagg.weighting`), split back into tensors.

Every session has its own id, keys and :class:`~edge_agent.secagg.SecAggServer`; messages are
routed by session id (:meth:`BufferSessions.on_message`) and anything a session cannot take is a
:class:`~edge_agent.errors.ContractViolation` (the dispatcher counts it; nothing changes). No I/O:
messages leave through the injected ``send``. Not thread-safe: the engine holds its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from broker_server.secagg_config import SecAggSettings
from broker_server.secagg_round import receive_from_member, task_fields
from edge_agent.errors import ContractViolation, SecAggAbort, SecAggError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import SecAggMessage
from edge_agent.protocol.secagg_messages import FFSA_HEADER_BYTES, SecAggTask
from edge_agent.secagg import SecAggParams, SecAggServer, ring_spec_for
from edge_agent.secagg.messages import Message as FFSAMessage
from edge_agent.secagg.weighting import decode_weighted, session_length, unflatten

__all__ = ["AbortedSession", "BufferSession", "BufferSessions", "SealedSession", "SessionEnd"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
#: ``(device_id, task_id, round, session, message)``: publish one FFSA message to a device
Send = Callable[[str, str, int, bytes, FFSAMessage], None]


@dataclass(frozen=True, kw_only=True, eq=False)
class SealedSession:
    """A buffer whose session completed: the survivors' example-weighted mean delta."""

    round: int
    base_version: int
    session: bytes
    cohort: int
    threshold: int
    delta: Tensors
    #: task ids of the survivors ``U3`` and of the devices dropped after sharing keys
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    total_examples: int
    failed: int
    opened_at: float
    #: every task of the cohort (task id -> device id)
    tasks: Mapping[str, str]


@dataclass(frozen=True, kw_only=True, eq=False)
class AbortedSession:
    """A buffer whose session aborted: nothing revealed, the buffer abandoned."""

    round: int
    base_version: int
    session: bytes
    reason: str
    failed: int
    opened_at: float
    tasks: Mapping[str, str]


SessionEnd = SealedSession | AbortedSession


@dataclass(eq=False)
class BufferSession:
    """One buffer's session: its cohort (task order = index order), phase and deadlines."""

    round: int
    base_version: int
    params: SecAggParams
    weight_unit: float
    #: task id -> device id, in index order (index 1 first)
    tasks: Mapping[str, str]
    opened_at: float
    #: the tasks' deadline on the engine's clock: the masked inputs are due by then
    task_deadline: float
    settings: SecAggSettings
    #: the aggregated tensors (the vector's order)
    specs: tuple[TensorSpec, ...]
    server: SecAggServer = field(init=False)
    members: dict[str, tuple[int, str]] = field(init=False)
    phase: str = field(init=False, default="keys")
    phase_ends: float = field(init=False)
    expected: set[int] = field(init=False)
    heard: set[int] = field(init=False, default_factory=set)
    failed: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.params)
        self.members = {t: (i, d) for i, (t, d) in enumerate(self.tasks.items(), start=1)}
        self.expected = set(range(1, self.params.cohort + 1))
        self.phase_ends = min(self.opened_at + self.settings.keys_timeout_s, self.task_deadline)

    @property
    def inbound_limit(self) -> int:
        """The largest device -> server FFSA message: a MaskedInput, or EncryptedShares for a big cohort."""
        masked = 7 + self.params.length * self.params.ring.width
        return FFSA_HEADER_BYTES + max(masked, 4 + 158 * self.params.cohort)

    def task_fields(self, task_id: str) -> SecAggTask:
        """The TASK's ``secagg`` object for the cohort member of ``task_id``."""
        return task_fields(self.params, self.members[task_id][0], self.weight_unit)

    def receive(self, message: SecAggMessage) -> None:
        """A device's message of this session; ContractViolation for one it cannot take."""
        if message.round != self.round:
            raise ContractViolation(f"SECAGG from {message.device_id!r} for task {message.task_id!r} of another device")
        receive_from_member(self.members, self.server, self.heard, self.inbound_limit, message)

    def fail(self, task_id: str) -> None:
        """The member of ``task_id`` failed its task (ERROR): no phase waits for it."""
        if task_id in self.members:
            self.failed.add(self.members[task_id][0])

    def step(self, now: float, send: Send) -> SessionEnd | None:
        """Close every phase that is done by ``now``; the session's end, or None while it runs."""
        try:
            while now >= self.phase_ends or not (self.expected - self.failed - self.heard):
                if self._close_phase(now, send):
                    return self._sealed()
        except SecAggError as exc:  # SecAggAbort, or shares/sums that do not add up: nothing revealed
            what = "aborted" if isinstance(exc, SecAggAbort) else "failed"
            return self.abort(f"secure aggregation {what}: {exc.reason}", send)
        return None

    def abort(self, reason: str, send: Send) -> AbortedSession:
        """End the session: an Abort to every member, the reason as the result."""
        message = self.server.abort_message(reason[:1000])
        for task_id, (_, device) in self.members.items():
            send(device, task_id, self.round, self.params.session, message)
        self.phase = "aborted"
        return AbortedSession(
            round=self.round,
            base_version=self.base_version,
            session=self.params.session,
            reason=reason,
            failed=len(self.failed),
            opened_at=self.opened_at,
            tasks=self.tasks,
        )

    def _close_phase(self, now: float, send: Send) -> bool:
        """Close the current phase and open the next; True once the sum is in."""
        server, settings = self.server, self.settings
        outgoing: Mapping[int, FFSAMessage]
        if self.phase == "keys":
            keys = server.key_list()
            outgoing = {d.index: keys for d in keys.devices}
            self._next("shares", set(outgoing), min(now + settings.shares_timeout_s, self.task_deadline))
        elif self.phase == "shares":
            outgoing = dict(server.share_bundles())
            self._next("masked", set(outgoing), self.task_deadline)
        elif self.phase == "masked":
            request = server.unmask_request()
            outgoing = {i: request for i in request.survivors}
            self._next("unmask", set(outgoing), now + settings.unmask_timeout_s)
        else:
            return True
        by_index = {i: (t, d) for t, (i, d) in self.members.items()}
        for index, message in sorted(outgoing.items()):
            task_id, device = by_index[index]
            send(device, task_id, self.round, self.params.session, message)
        return False

    def _next(self, phase: str, expected: set[int], ends: float) -> None:
        self.phase, self.expected, self.phase_ends, self.heard = phase, expected, ends, set()

    def _sealed(self) -> SealedSession:
        result = self.server.result()
        weighted = decode_weighted(result.ring_sum, result.count, self.params.ring, self.weight_unit)
        by_index = {i: t for t, (i, _) in self.members.items()}
        self.phase = "sealed"
        return SealedSession(
            round=self.round,
            base_version=self.base_version,
            session=self.params.session,
            cohort=self.params.cohort,
            threshold=self.params.threshold,
            delta=unflatten(weighted.mean, self.specs),
            survivors=tuple(by_index[i] for i in result.survivors),
            dropped=tuple(by_index[i] for i in result.dropped),
            total_examples=weighted.total_examples,
            failed=len(self.failed),
            opened_at=self.opened_at,
            tasks=self.tasks,
        )


class BufferSessions:
    """The open buffers' sessions, by session id; opens, routes, steps and ends them."""

    def __init__(
        self,
        settings: SecAggSettings,
        specs: tuple[TensorSpec, ...],
        *,
        send: Send,
        session_ids: Callable[[], bytes],
    ) -> None:
        self.settings, self.specs = settings, specs
        self.size = sum(int(np.prod(spec.shape)) for spec in specs)
        self._send, self._session_ids = send, session_ids
        self._open: dict[bytes, BufferSession] = {}

    @property
    def open(self) -> tuple[BufferSession, ...]:
        return tuple(self._open.values())

    def rounds(self) -> list[int]:
        return sorted(s.round for s in self._open.values())

    def too_few(self, cohort: int) -> str:
        """Why ``cohort`` devices cannot run a session ("" if they can)."""
        threshold = self.settings.threshold_for(cohort)
        if cohort < 2 or threshold > cohort:
            return (
                f"secure aggregation needs at least {max(2, threshold)} devices (threshold {threshold}), got {cohort}"
            )
        return ""

    def start(
        self,
        round_: int,
        base_version: int,
        tasks: Mapping[str, str],
        *,
        counts: Sequence[int],
        now: float,
        task_timeout_s: float,
    ) -> BufferSession:
        """Open buffer ``round_``'s session: ``tasks`` (task id -> device, index order) on ``base_version``.

        ``counts``: the cohort's reported example counts (their mean is the weight unit).
        """
        cohort = len(tasks)
        if reason := self.too_few(cohort):
            raise ContractViolation(reason)
        ring = ring_spec_for(cohort, clip=self.settings.clip, quant_bits=self.settings.quant_bits)
        params = SecAggParams(
            session=self._session_ids(),
            cohort=cohort,
            threshold=self.settings.threshold_for(cohort),
            length=session_length(self.size, ring),
            ring=ring,
        )
        positive = [c for c in counts if c > 0]
        session = BufferSession(
            round=round_,
            base_version=base_version,
            params=params,
            weight_unit=float(np.mean(positive)) if positive else 1.0,
            tasks=dict(tasks),
            opened_at=now,
            task_deadline=now + task_timeout_s,
            settings=self.settings,
            specs=self.specs,
        )
        self._open[params.session] = session
        log.info(
            "buffer %d: secure aggregation of %d devices on v%d, threshold %d, %d-bit ring, session %s",
            round_,
            cohort,
            base_version,
            params.threshold,
            ring.ring_bits,
            params.session.hex()[:8],
        )
        return session

    def on_message(self, message: SecAggMessage) -> None:
        """Route a device's SECAGG message to its session; ContractViolation if none takes it."""
        session = self._open.get(message.session)
        if session is None:
            raise ContractViolation(f"SECAGG {message.kind_name} for an unknown session (buffer {message.round})")
        session.receive(message)

    def fail(self, task_id: str) -> None:
        for session in self._open.values():
            session.fail(task_id)

    def step(self, now: float, *, current_version: int, max_staleness: int) -> list[SessionEnd]:
        """Advance every open session; the sessions that ended (sealed or aborted), oldest buffer first."""
        ended: list[SessionEnd] = []
        for key, session in sorted(self._open.items(), key=lambda item: item[1].round):
            behind = current_version - session.base_version
            if behind > max_staleness:
                reason = f"the cohort's model v{session.base_version} is {behind} versions behind (max {max_staleness})"
                end: SessionEnd | None = session.abort(reason, self._send)
            else:
                end = session.step(now, self._send)
            if end is not None:
                del self._open[key]
                ended.append(end)
        return ended

    def abort_all(self, reason: str) -> list[AbortedSession]:
        """Abort every open session (e.g. the federation has made its versions)."""
        ended = [session.abort(reason, self._send) for session in self._open.values()]
        self._open.clear()
        return ended
