"""Secure aggregation of a sync round over MQTT: one session per round, its phases and deadlines.

:class:`SecAggRounds` is the round engine's hook when ``[secagg]`` is on (docs/secagg.md,
"Over MQTT"). For round ``r`` with the selected devices as its cohort (indexed ``1..n`` in task
order), a fresh 16-byte session id, ``t`` from the settings and the ring from
:func:`~edge_agent.secagg.ring.ring_spec_for`:

1. :meth:`open` makes the :class:`~edge_agent.secagg.SecAggServer`; :meth:`decorate` gives every
   TASK its ``secagg`` object (index, cohort, threshold, ring, clip, length, ``weight_unit`` = the
   cohort's mean reported example count) and offers only the ``fp32`` codec (the device decodes its
   own update before quantizing into the ring: a lossy codec would only add error);
2. :meth:`collect` runs the phases, each closing when every expected device answered or at its
   deadline: keys (``keys_timeout_s``) -> KeyList to ``U1``; shares (``shares_timeout_s``) -> one
   ShareBundle per member of ``U2``; masked inputs (the round's deadline: devices train meanwhile)
   -> UnmaskRequest to the survivors ``U3``; unmasking shares (``unmask_timeout_s``) -> the sum.
   A phase that closes with fewer than ``t`` devices aborts: an Abort goes to every member, the
   round is abandoned with the reason and nothing was revealed (the server held only masked
   inputs folded into one running sum, and fewer than ``t`` shares of anything);
3. the decoded sum is the example-weighted mean (:mod:`edge_agent.secagg.weighting`), returned
   as a :class:`SecAggOutcome` for ``strategy.apply``.

SECAGG messages reach :meth:`on_message` through the dispatcher; anything that does not belong
to the open session's current phase (unknown session, another device's index, oversize,
malformed, a second different message) is a :class:`~edge_agent.errors.ProtocolError`: rejected
and counted, nothing else changes. The open round's number is kept in the store setting
``secagg_round`` while its session runs; a restarted server abandons that round (a masked sum
cannot be resumed without keeping secrets: :meth:`unresumable`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from broker_server.journal import RoundJournal
from broker_server.registry import DeviceRegistry
from broker_server.rounds import RoundState
from broker_server.secagg_config import SecAggSettings
from edge_agent.errors import ContractViolation, SecAggAbort, SecAggError
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import SecAggMessage, TaskMessage, encode_message
from edge_agent.protocol.secagg_messages import FFSA_HEADER_BYTES, SecAggTask, check_size
from edge_agent.protocol.topics import Topics
from edge_agent.secagg import (
    Abort,
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    SecAggParams,
    SecAggServer,
    UnmaskResponse,
    decode,
    encode,
    ring_spec_for,
)
from edge_agent.secagg.messages import Message as FFSAMessage
from edge_agent.secagg.weighting import decode_weighted, session_length, unflatten
from edge_agent.transport.base import Transport

__all__ = ["SecAggOutcome", "SecAggRounds", "receive_ffsa", "secagg_rounds", "sender_index"]

if TYPE_CHECKING:
    from broker_server.server_config import ServerConfig

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
#: the store setting naming the round whose session is running
SETTING = "secagg_round"


@dataclass(frozen=True, kw_only=True, eq=False)
class SecAggOutcome:
    """A completed session: the example-weighted mean delta of the survivors, and counts."""

    delta: Tensors
    survivors: int
    dropped: int
    total_examples: int


@dataclass(eq=False)
class _Session:
    round: int
    params: SecAggParams
    server: SecAggServer
    weight_unit: float
    #: task id -> (index, device id)
    members: dict[str, tuple[int, str]]
    #: indices heard from in the current phase
    heard: set[int] = field(default_factory=set)

    @property
    def inbound_limit(self) -> int:
        """The largest device -> server FFSA message: a MaskedInput, or EncryptedShares for a big cohort."""
        masked = 7 + self.params.length * self.params.ring.width
        return FFSA_HEADER_BYTES + max(masked, 4 + 158 * self.params.cohort)


class SecAggRounds:
    """The open round's session (at most one) and the phases that drive it."""

    def __init__(
        self,
        settings: SecAggSettings,
        specs: tuple[TensorSpec, ...],
        *,
        transport: Transport,
        topics: Topics,
        registry: DeviceRegistry,
        journal: RoundJournal,
        pump: Callable[[float], None],
        clock: Callable[[], float],
        session_ids: Callable[[], bytes] = lambda: secrets.token_bytes(16),
    ) -> None:
        self.settings, self.specs = settings, specs
        self.size = sum(int(np.prod(spec.shape)) for spec in specs)
        self._transport, self._topics, self._registry = transport, topics, registry
        self._journal, self._pump, self._clock = journal, pump, clock
        self._session_ids = session_ids
        self._session: _Session | None = None

    # -- opening -----------------------------------------------------------------------------------
    def too_few(self, cohort: int) -> str:
        """Why a round of ``cohort`` devices cannot run a session ("" if it can)."""
        threshold = self.settings.threshold_for(cohort)
        if cohort < 2 or threshold > cohort:
            return (
                f"secure aggregation needs at least {max(2, threshold)} devices (threshold {threshold}), got {cohort}"
            )
        return ""

    def open(self, state: RoundState) -> None:
        """Start round ``state``'s session with its tasks' devices as the cohort (task order)."""
        cohort = len(state.tasks)
        ring = ring_spec_for(cohort, clip=self.settings.clip, quant_bits=self.settings.quant_bits)
        params = SecAggParams(
            session=self._session_ids(),
            cohort=cohort,
            threshold=self.settings.threshold_for(cohort),
            length=session_length(self.size, ring),
            ring=ring,
        )
        members = {task_id: (i, device) for i, (task_id, device) in enumerate(state.tasks.items(), start=1)}
        counts = [r.num_examples for d in state.tasks.values() if (r := self._registry.get(d)) and r.num_examples > 0]
        unit = float(np.mean(counts)) if counts else 1.0
        self._session = _Session(state.round, params, SecAggServer(params), unit, members)
        self._journal.save_setting(SETTING, {"round": state.round})
        log.info(
            "round %d: secure aggregation of %d devices, threshold %d, %d-bit ring, session %s",
            state.round,
            cohort,
            params.threshold,
            ring.ring_bits,
            params.session.hex()[:8],
        )

    def decorate(self, task: TaskMessage) -> TaskMessage:
        """``task`` with its device's part in the session (and the fp32 codec only)."""
        session = self._require()
        fields = task_fields(session.params, session.members[task.task_id][0], session.weight_unit)
        # an agent forgets its session at the TASK's deadline, and the unmasking answers come up to
        # unmask_timeout_s after the round's deadline (when someone dropped at masking)
        deadline_s = task.deadline_s + self.settings.unmask_timeout_s
        return replace(task, codecs=("fp32",), secagg=fields, deadline_s=deadline_s)

    @staticmethod
    def unresumable(journal: RoundJournal, number: int, enabled: bool) -> str:
        """Why a round restored after a restart must be abandoned ("" if it may continue)."""
        stored = journal.load_setting(SETTING)
        if enabled or (isinstance(stored, Mapping) and stored.get("round") == number):
            journal.save_setting(SETTING, None)
            return (
                f"server restarted during secure-aggregation round {number}: a masked sum cannot be resumed "
                "without keeping secrets (the devices' sessions are gone)"
            )
        return ""

    # -- messages ----------------------------------------------------------------------------------
    def on_message(self, message: SecAggMessage) -> None:
        """A device's SECAGG message; ProtocolError for one the open session cannot take."""
        session = self._session
        if session is None or message.session != session.params.session or message.round != session.round:
            raise ContractViolation(f"SECAGG {message.kind_name} for an unknown session (round {message.round})")
        receive_from_member(session.members, session.server, session.heard, session.inbound_limit, message)

    # -- the phases --------------------------------------------------------------------------------
    def collect(self, state: RoundState, *, deadline: float) -> SecAggOutcome | str:
        """Run the session's phases (``deadline``: the round's); the outcome, or why it was abandoned."""
        session = self._require()
        server, settings = session.server, self.settings
        try:
            self._phase(session, state, set(range(1, session.params.cohort + 1)), settings.keys_timeout_s, deadline)
            keys = server.key_list()
            u1 = {d.index for d in keys.devices}
            self._send({i: keys for i in u1})
            self._phase(session, state, u1, settings.shares_timeout_s, deadline)
            bundles = server.share_bundles()
            self._send(dict(bundles))
            self._phase(session, state, set(bundles), None, deadline)
            request = server.unmask_request()
            self._send({i: request for i in request.survivors})
            self._phase(session, state, set(request.survivors), settings.unmask_timeout_s, None)
            result = server.result()
            weighted = decode_weighted(result.ring_sum, result.count, session.params.ring, session.weight_unit)
        except SecAggError as exc:  # SecAggAbort, or shares/sums that do not add up: nothing revealed
            self._send({i: server.abort_message(exc.reason) for i, _ in session.members.values()})
            what = "aborted" if isinstance(exc, SecAggAbort) else "failed"
            return f"secure aggregation {what}: {exc.reason}"
        finally:
            self._session = None
            self._journal.save_setting(SETTING, None)
        log.info(
            "round %d: secure sum of %d devices (%d dropped after sharing keys), %d examples",
            state.round,
            result.count,
            len(result.dropped),
            weighted.total_examples,
        )
        return SecAggOutcome(
            delta=unflatten(weighted.mean, self.specs),
            survivors=result.count,
            dropped=len(result.dropped),
            total_examples=weighted.total_examples,
        )

    def _phase(
        self, session: _Session, state: RoundState, expected: set[int], timeout: float | None, deadline: float | None
    ) -> None:
        """Pump until every expected device that did not fail its task was heard, or the phase's deadline."""
        session.heard = set()
        end = min(t for t in (deadline, None if timeout is None else self._clock() + timeout) if t is not None)
        index = {task_id: i for task_id, (i, _) in session.members.items()}
        while self._clock() < end:
            failed = {index[t] for t in state.failed if t in index}
            if not (expected - failed - session.heard):
                return
            self._pump(min(0.25, max(end - self._clock(), 0.0)))

    def _send(self, messages: Mapping[int, FFSAMessage]) -> None:
        session = self._require()
        by_index = {i: (task_id, device) for task_id, (i, device) in session.members.items()}
        for index, message in sorted(messages.items()):
            task_id, device = by_index[index]
            envelope = SecAggMessage(
                device_id=device,
                round=session.round,
                task_id=task_id,
                session=session.params.session,
                payload=encode(message),
            )
            self._transport.publish(self._topics.tasks(device), encode_message(envelope), qos=1)

    def _require(self) -> _Session:
        if self._session is None:
            raise ContractViolation("no secure-aggregation session is open")
        return self._session


def secagg_rounds(
    config: ServerConfig,
    specs: tuple[TensorSpec, ...],
    transport: Transport,
    registry: DeviceRegistry,
    journal: RoundJournal,
    pump: Callable[[float], None],
    clock: Callable[[], float],
) -> SecAggRounds | None:
    """The round engine's secure-aggregation hook as ``config.secagg`` says (None: off)."""
    settings = config.secagg_settings()
    if settings is None:
        return None
    return SecAggRounds(
        settings,
        specs,
        transport=transport,
        topics=config.topics,
        registry=registry,
        journal=journal,
        pump=pump,
        clock=clock,
    )


def receive_ffsa(server: SecAggServer, decoded: FFSAMessage, message: SecAggMessage) -> bool:
    """Give a device's decoded message to its phase; True if new. ContractViolation for another phase's."""
    try:
        if isinstance(decoded, AdvertiseKeys):
            return server.receive_keys(decoded)
        if isinstance(decoded, EncryptedShares):
            return server.receive_shares(decoded)
        if isinstance(decoded, MaskedInput):
            return server.receive_masked(decoded)
        if isinstance(decoded, UnmaskResponse):
            return server.receive_unmask(decoded)
    except SecAggError as exc:  # a message for another phase: refused, the session goes on
        raise ContractViolation(f"SECAGG {message.kind_name} from {message.device_id}: {exc.reason}") from exc
    raise ContractViolation(f"{type(decoded).__name__} is not a device -> server message")


def receive_from_member(
    members: Mapping[str, tuple[int, str]],
    server: SecAggServer,
    heard: set[int],
    inbound_limit: int,
    message: SecAggMessage,
) -> None:
    """Hand a cohort member's SECAGG message to the session's ``server`` (sync round or buffer);
    ContractViolation for another device's task, an oversize message or a wrong index."""
    member = members.get(message.task_id)
    if member is None or member[1] != message.device_id:
        raise ContractViolation(f"SECAGG from {message.device_id!r} for task {message.task_id!r} of another device")
    check_size(message, inbound_limit)
    decoded = decode(message.payload)
    index = sender_index(decoded)
    if index != member[0]:
        raise ContractViolation(f"SECAGG {message.kind_name} names index {index}; this device is {member[0]}")
    if receive_ffsa(server, decoded, message):
        heard.add(index)


def task_fields(params: SecAggParams, index: int, weight_unit: float) -> SecAggTask:
    """The TASK's ``secagg`` object for cohort member ``index`` of the session ``params``."""
    return SecAggTask(
        session=params.session,
        index=index,
        cohort=params.cohort,
        threshold=params.threshold,
        quant_bits=params.ring.quant_bits,
        ring_bits=params.ring.ring_bits,
        clip=float(params.ring.clip),
        length=params.length,
        weight_unit=weight_unit,
    )


def sender_index(message: FFSAMessage) -> int:
    """The index a device -> server message names as its sender (ContractViolation for other types)."""
    if isinstance(message, AdvertiseKeys):
        return message.keys.index
    if isinstance(message, EncryptedShares | MaskedInput | UnmaskResponse):
        return message.sender
    if isinstance(message, Abort):
        raise ContractViolation("devices do not send Abort")
    raise ContractViolation(f"{type(message).__name__} is not a device -> server message")
