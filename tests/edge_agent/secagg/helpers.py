"""Shared pieces of the secure-aggregation tests: seeded randomness and a session driver."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from edge_agent.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    decode,
    default_threshold,
    encode,
    quantize,
    ring_spec_for,
)
from edge_agent.secagg.messages import Message

M = TypeVar("M", bound=Message)


class SeededRandom:
    """A reproducible RandomSource for tests (never for real sessions)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def token_bytes(self, n: int) -> bytes:
        return self._random.randbytes(n)


def make_params(
    cohort: int, length: int, *, clip: float = 0.1, threshold: int | None = None, session: bytes = bytes(range(16))
) -> SecAggParams:
    return SecAggParams(
        session=session,
        cohort=cohort,
        threshold=default_threshold(cohort) if threshold is None else threshold,
        length=length,
        ring=ring_spec_for(cohort, clip=clip),
    )


def wire(message: M) -> M:
    """What the other side receives: the message after a trip through its bytes."""
    back = decode(encode(message))
    assert isinstance(back, type(message))
    return back


@dataclass
class Session:
    params: SecAggParams
    server: SecAggServer
    clients: dict[int, SecAggClient]
    updates: dict[int, np.ndarray]
    codes: dict[int, np.ndarray]


def start_session(
    cohort: int, length: int, *, seed: int = 0, clip: float = 0.1, session: bytes = bytes(range(16))
) -> Session:
    """Every device advertises, shares keys and quantizes its update (nothing masked yet)."""
    params = make_params(cohort, length, clip=clip, session=session)
    server = SecAggServer(params)
    clients = {i: SecAggClient(params, i, rng=SeededRandom(seed * 1000 + i)) for i in range(1, cohort + 1)}
    for client in clients.values():
        assert server.receive_keys(wire(client.advertise()))
    keys = wire(server.key_list())
    for client in clients.values():
        assert server.receive_shares(wire(client.share_keys(keys)))
    rng = np.random.default_rng(seed)
    updates = {i: rng.normal(0.0, clip / 2, length) for i in clients}
    codes = {i: quantize(updates[i], params.ring, rng) for i in clients}
    return Session(params, server, clients, updates, codes)


def mask_all(session: Session, dropped: Collection[int] = ()) -> None:
    """Every device masks; the masked inputs of ``dropped`` devices never reach the server."""
    bundles = session.server.share_bundles()
    for index, client in session.clients.items():
        masked = client.mask(wire(bundles[index]), session.codes[index])
        if index not in dropped:
            assert session.server.receive_masked(wire(masked))
