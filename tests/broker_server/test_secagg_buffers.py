"""Secure aggregation per FedBuff buffer, the bookkeeping alone: several sessions at once, routing,
failed members, staleness and aborts (real SecAggClient state machines, no transport, a fake clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from broker_server.secagg_buffers import AbortedSession, BufferSessions, SealedSession
from broker_server.secagg_config import SecAggSettings
from edge_agent.errors import ContractViolation
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import SecAggMessage
from edge_agent.secagg import Abort, KeyList, SecAggClient, ShareBundle, UnmaskRequest, encode
from edge_agent.secagg.messages import Message
from edge_agent.secagg.weighting import encode_weighted, weighted_bound

SPECS = tuple(
    TensorSpec(name=name, shape=shape, dtype="float32", role="parameter", trainable=True, aggregate=True)
    for name, shape in (("w", (3, 2)), ("b", (2,)))
)
SETTINGS = SecAggSettings(threshold_fraction=0.5, clip=1.0, quant_bits=16, keys_timeout_s=5, shares_timeout_s=5)


@dataclass
class Member:
    """One device's part in one session: its client, its update and example count."""

    device: str
    task_id: str
    client: SecAggClient
    update: np.ndarray
    examples: int
    #: the session's weight unit W (the TASK's ``secagg.weight_unit``)
    unit: float = 1.0
    #: server -> device messages, by type name
    got: list[str] = field(default_factory=list)


class Harness:
    """The sessions' ``send`` port: keeps what the server sends; :meth:`deliver` plays the devices."""

    def __init__(self) -> None:
        self.outbox: list[tuple[str, str, int, bytes, Message]] = []
        self.members: dict[tuple[bytes, str], Member] = {}
        self.sessions = BufferSessions(SETTINGS, SPECS, send=self.send, session_ids=self._ids)
        self._next_id = 0

    def _ids(self) -> bytes:
        self._next_id += 1
        return bytes([self._next_id]) * 16

    def send(self, device: str, task_id: str, round_: int, session: bytes, message: Message) -> None:
        self.outbox.append((device, task_id, round_, session, message))

    def open(self, round_: int, devices: list[str], examples: list[int], *, version: int = 0) -> bytes:
        tasks = {f"t{round_}-{d}": d for d in devices}
        s = self.sessions.start(round_, version, tasks, counts=examples, now=0.0, task_timeout_s=60)
        rng = np.random.default_rng(round_)
        for (task_id, device), n in zip(tasks.items(), examples, strict=True):
            fields = s.task_fields(task_id)
            client = SecAggClient(s.params, fields.index)
            member = Member(device, task_id, client, rng.normal(0, 0.05, 8), n, fields.weight_unit)
            self.members[s.params.session, task_id] = member
            self.reply(s.params.session, round_, member, encode(client.advertise()))
        return s.params.session

    def reply(self, session: bytes, round_: int, member: Member, payload: bytes) -> None:
        message = SecAggMessage(
            device_id=member.device, round=round_, task_id=member.task_id, session=session, payload=payload
        )
        self.sessions.on_message(message)

    def deliver(self, *, silent: frozenset[str] = frozenset()) -> None:
        """Every queued server message to its device; ``silent`` devices (task ids) never answer."""
        while self.outbox:
            _, task_id, round_, session, message = self.outbox.pop(0)
            member = self.members[session, task_id]
            member.got.append(type(message).__name__)
            if task_id in silent or isinstance(message, Abort):
                continue
            spec = member.client.params.ring
            if isinstance(message, KeyList):
                answer = member.client.share_keys(message)
            elif isinstance(message, ShareBundle):
                codes = encode_weighted(member.update, member.examples, member.unit, spec, np.random.default_rng(1))
                answer = member.client.mask(message, codes)
            else:
                assert isinstance(message, UnmaskRequest)
                answer = member.client.unmask(message)
            self.reply(session, round_, member, encode(answer))


def run(h: Harness, now: float = 1.0, *, silent: frozenset[str] = frozenset(), version: int = 0) -> list:
    ended = []
    for _ in range(6):
        ended += h.sessions.step(now, current_version=version, max_staleness=2)
        h.deliver(silent=silent)
    return ended


def fedavg(h: Harness, session: bytes, task_ids: list[str]) -> np.ndarray:
    members = [h.members[session, t] for t in task_ids]
    total = sum(m.examples for m in members)
    return sum(m.examples * m.update for m in members) / total


def test_two_open_sessions_share_a_device_and_each_sums_only_its_own_cohort() -> None:
    h = Harness()
    first = h.open(1, ["a", "b", "c"], [10, 12, 14])
    second = h.open(2, ["c", "d", "e"], [11, 13, 15])  # c is in both, with its own keys per session
    h.sessions.fail("t2-e")  # e advertised keys, then its task failed (ERROR): no phase waits for it
    # the clock never reaches a deadline: every phase closed because every expected device answered
    ended = run(h, silent=frozenset({"t2-e"}))
    assert [type(e) for e in ended] == [SealedSession, SealedSession] and not h.sessions.open
    by_round = {e.round: e for e in ended}
    assert by_round[1].survivors == ("t1-a", "t1-b", "t1-c") and by_round[1].total_examples == 36
    assert by_round[2].survivors == ("t2-c", "t2-d") and by_round[2].total_examples == 24
    for end, session in ((by_round[1], first), (by_round[2], second)):
        flat = np.concatenate([end.delta["w"].reshape(-1), end.delta["b"]]).astype(np.float64)
        spec = h.members[session, end.survivors[0]].client.params.ring
        bound = weighted_bound(len(end.survivors), spec, 12.0, end.total_examples)
        assert np.abs(flat - fedavg(h, session, list(end.survivors))).max() < bound
    assert "UnmaskRequest" in h.members[second, "t2-d"].got and h.members[second, "t2-e"].got == ["KeyList"]


def test_a_message_is_routed_by_session_and_refused_for_another_cohort() -> None:
    h = Harness()
    first = h.open(1, ["a", "b"], [10, 10])
    h.open(2, ["c", "d"], [10, 10])
    stranger = h.members[first, "t1-a"]
    wrong = Member("c", "t2-c", stranger.client, stranger.update, 10)  # session 1's keys under session 2's task
    with pytest.raises(ContractViolation, match="another device"):
        h.reply(first, 1, wrong, encode(stranger.client.advertise()))
    with pytest.raises(ContractViolation, match="unknown session"):
        h.reply(b"\x09" * 16, 1, stranger, encode(stranger.client.advertise()))
    assert len(h.sessions.open) == 2


def test_below_threshold_after_masking_aborts_the_buffer_and_sends_no_unmasking_request() -> None:
    h = Harness()
    session = h.open(1, ["a", "b", "c", "d", "e"], [10] * 5)  # t = 3 of 5
    ended = run(h, silent=frozenset({"t1-c", "t1-d", "t1-e"}))  # three never answer the key list
    assert ended == [] and h.sessions.open
    ended = run(h, now=1000.0)  # the shares phase times out with 2 < 3
    assert len(ended) == 1 and isinstance(ended[0], AbortedSession) and "aborted" in ended[0].reason
    got = {t: h.members[session, t].got for t in ("t1-a", "t1-c")}
    assert got["t1-a"][-1] == "Abort" and got["t1-c"][-1] == "Abort"
    assert all("UnmaskRequest" not in g for g in got.values())


def test_a_cohort_too_far_behind_is_aborted_as_stale() -> None:
    h = Harness()
    session = h.open(1, ["a", "b"], [10, 10], version=0)
    ended = h.sessions.step(1.0, current_version=3, max_staleness=2)
    assert len(ended) == 1 and isinstance(ended[0], AbortedSession) and "3 versions behind" in ended[0].reason
    h.deliver()
    assert [h.members[session, t].got for t in ("t1-a", "t1-b")] == [["Abort"], ["Abort"]]


def test_a_cohort_too_small_for_its_threshold_is_refused() -> None:
    h = Harness()
    with pytest.raises(ContractViolation, match="at least 2 devices"):
        h.sessions.start(1, 0, {"t": "a"}, counts=[1], now=0.0, task_timeout_s=1)
