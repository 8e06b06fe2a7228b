"""Tiered trust and participation counters for asynchronous versions (FedBuff), as sync rounds keep them.

The asynchronous engine (:mod:`broker_server.async_engine`) calls one :class:`AsyncObservers` at
four points:

* :meth:`~AsyncObservers.issued` — TASKs were sent: each device's ``selected`` counter;
* :meth:`~AsyncObservers.accepted` — FedBuff accepted an UPDATE: the device's ``accepted``
  counter and, with tiered trust, the update's distance and cosine similarity to the *reference*;
* :meth:`~AsyncObservers.failed` — a device answered its TASK with an ERROR: ``failed``;
* :meth:`~AsyncObservers.sealed` — a sealed buffer's version was stored: its contributions'
  observations go to the reputation (:meth:`Safeguards.observe_updates`, with the buffer's round
  number), the reputation is stored (:data:`~broker_server.safeguards.TRUST_SETTING`), and the
  buffer's mean delta becomes the next reference.

**Why the previous buffer's aggregate is the reference.** A sync round under trust measures every
update against an aggregate: the robust rule's over its buffer, or — streaming — the previous
round's, because a streaming round's own aggregate does not exist until every update is folded in.
FedBuff is streaming too, and measuring each update against its own buffer's mean at the seal would
mean keeping every update of the buffer decoded (``buffer_size × model`` floats). So an update is
measured on arrival (decoded once more, one tensor at a time, float64) against the mean delta of
the last sealed buffer: the same choice as a streaming sync round. The first buffer of a run (and
the first after a restart) has no reference, so it observes nothing. A device with two updates in
one buffer is observed once, by its worse one (larger distance, smaller cosine).

**Counters.** The store's per-device ``selected``/``accepted``/``failed`` counters are kept by the
store itself for rounds' tasks, in the rounds' transactions; asynchronous tasks have no round rows,
so they are counted here through :class:`ParticipationStore` (one short transaction per call,
after the engine stored its ledger): a crash in between loses that count, never counts twice.

Pure apart from the two injected sinks (the counters and the settings journal); no I/O in the
constructor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from broker_server.fedbuff import BufferResult
from broker_server.robust import Observation, TrustDecision
from broker_server.safeguards import TRUST_SETTING, Safeguards
from edge_agent.codecs import parse_update
from edge_agent.protocol.manifest import TensorSpec
from edge_agent.protocol.messages import UpdateMessage

__all__ = ["AsyncObservers", "Counter", "ParticipationStore", "SettingsJournal", "measure_update", "worst"]

log = logging.getLogger("fedflock.server")

#: the participation counter an event adds one to
Counter = Literal["selected", "accepted", "failed"]


class ParticipationStore(Protocol):
    """What counts participation outside rounds (:class:`~broker_server.persistence.ServerStore`)."""

    def count_participation(self, counter: str, device_ids: Sequence[str]) -> None:
        """Add one to ``counter`` of every device in ``device_ids``, in one transaction."""


class SettingsJournal(Protocol):
    """Where the reputation is stored (:class:`~broker_server.journal.RoundJournal`)."""

    def save_setting(self, key: str, value: Any) -> None: ...


def measure_update(
    payload: bytes | bytearray | memoryview,
    expected: Mapping[str, tuple[int, ...]],
    reference: Mapping[str, np.ndarray],
) -> Observation:
    """L2 distance and cosine similarity of an encoded update to ``reference`` (float64, tensor by tensor).

    The cosine of a zero update (or to a zero reference) is 0. Raises
    :class:`~edge_agent.errors.ProtocolError` for a payload that does not match ``expected``.
    """
    parsed = parse_update(payload, expected)
    squares = dot = ref_squares = 0.0
    for record in parsed.records:
        x = np.asarray(parsed.record_codec(record).decode(record), dtype=np.float64).reshape(-1)
        r = np.asarray(reference[record.name], dtype=np.float64).reshape(-1)
        squares += float(x @ x)
        dot += float(x @ r)
        ref_squares += float(r @ r)
    norm, ref_norm = math.sqrt(squares), math.sqrt(ref_squares)
    cosine = dot / (norm * ref_norm) if norm > 0 and ref_norm > 0 else 0.0
    distance = math.sqrt(max(0.0, squares - 2.0 * dot + ref_squares))
    return Observation(distance=distance, cosine=max(-1.0, min(1.0, cosine)))


def worst(a: Observation, b: Observation) -> Observation:
    """One observation for two updates of a device: the larger distance and the smaller cosine."""
    distances = [d for d in (a.distance, b.distance) if d is not None]
    cosines = [c for c in (a.cosine, b.cosine) if c is not None]
    return Observation(distance=max(distances) if distances else None, cosine=min(cosines) if cosines else None)


class AsyncObservers:
    """The asynchronous engine's trust and participation hooks (see the module docstring)."""

    def __init__(
        self,
        safeguards: Safeguards,
        specs: tuple[TensorSpec, ...],
        *,
        journal: SettingsJournal,
        counters: ParticipationStore | None,
    ) -> None:
        """``specs``: the aggregated tensors; ``counters``: the server store (None: nothing counted)."""
        self._safeguards, self._journal, self._counters = safeguards, journal, counters
        self._expected = {spec.name: spec.shape for spec in specs}
        #: the last sealed buffer's mean delta (None: nothing to measure against yet)
        self.reference: dict[str, np.ndarray] | None = None
        #: task id -> (device id, observation) of accepted updates whose buffer has not sealed yet
        self._pending: dict[str, tuple[str, Observation]] = {}

    @property
    def trusting(self) -> bool:
        return self._safeguards.reputation is not None

    def issued(self, device_ids: Iterable[str]) -> None:
        """TASKs went out to ``device_ids`` (one entry per task)."""
        self._count("selected", list(device_ids))

    def accepted(self, update: UpdateMessage) -> None:
        """FedBuff accepted ``update`` (already validated: a payload that fails to decode is a bug)."""
        self._count("accepted", [update.device_id])
        if self.trusting and self.reference is not None:
            observation = measure_update(update.payload, self._expected, self.reference)
            self._pending[update.task_id] = (update.device_id, observation)

    def failed(self, device_id: str) -> None:
        """``device_id`` answered its TASK with an ERROR."""
        self._count("failed", [device_id])

    def sealed(self, round_number: int, sealed: BufferResult) -> list[TrustDecision]:
        """``sealed``'s version (buffer ``round_number``) is stored: observe its updates; returns the decisions."""
        observations: dict[str, Observation] = {}
        for contribution in sealed.contributors:
            found = self._pending.pop(contribution.task_id, None)
            if found is not None:
                device_id, observation = found
                seen = observations.get(device_id)
                observations[device_id] = observation if seen is None else worst(seen, observation)
        if not self.trusting:
            return []
        decisions = self._safeguards.observe_updates(round_number, observations)
        self.reference = {name: np.array(value, dtype=np.float32) for name, value in sealed.mean_delta.items()}
        # after the version's commit: a crash in between loses one buffer's observations, never
        # observes one twice (the reputation refuses a round it holds)
        self._journal.save_setting(TRUST_SETTING, self._safeguards.state())
        return decisions

    def _count(self, counter: Counter, device_ids: list[str]) -> None:
        if self._counters is not None and device_ids:
            self._counters.count_participation(counter, device_ids)
