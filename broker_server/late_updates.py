"""Stragglers' updates in sync mode with ``late_updates = "async"``: folded into the next round.

An update that arrives after its round closed (an over-selected straggler, a device past the
deadline) is offered to a :class:`~broker_server.fedbuff.FedBuff` by
:func:`~broker_server.selection.route_late_update` (only for a task the closed round issued to
that device and did not count: never twice; its nonce and base digest checked again through the
task table, :mod:`broker_server.update_binding`). Its weight is ``num_examples × f(s)`` with ``s`` the
versions the model moved on since the task's version (``asynchronous.staleness``; refused past
``asynchronous.max_staleness``). The pending late updates then *join the next completed round's
aggregate*: :func:`combine` merges the two weighted means, so the round's delta is the mean over
the round's own updates (weight ``n_i``) and the late ones (weight ``n_j·f(s_j)``), and the strategy
steps once per round, as it does without late updates.

Why not a version of their own: a late buffer applied on its own would make model versions (and
strategy steps, e.g. FedAdam's moments) between rounds, out of the rounds' numbering; joining the
next round keeps one version per round and lets the stale updates count less than fresh ones.
A round that is abandoned leaves them pending for the next one that completes.

**BatchNorm statistics are rebased**, as in async mode (:func:`~broker_server.async_results.rebase_buffers`):
a late device's running statistics are ``w[b] + Δ`` for its base version ``b``, and adding its
``Δ`` to the newer model ``w[c]`` (what a plain fold does) can even leave a negative running
variance. :meth:`LateUpdates.take` therefore adds ``Σ α_j (w[b_j] − w[c])`` (``α_j``: the late
updates' shares of the late weight) to each plain tensor's late mean, so the round's aggregate
makes those tensors the weighted mean of every contributor's *own* statistics. The plain tensors
of ``w[b]`` and ``w[c]`` come from :meth:`LateUpdates.remember` (the engine's model before each
round it completes) or, for versions it did not see (a restart), from the server store's model
versions; a late update whose base is in neither is folded uncorrected (logged).

Persistence: every accepted late update rewrites the store setting :data:`LATE_SETTING` (an
:class:`~broker_server.async_ledger.AsyncLedger`, no tasks) before the next message is handled;
a restarted server refolds it if its base version is still the latest, and drops it if a stored
version already includes it (the round's version row and the ledger are separate writes).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np

from broker_server.async_config import AsyncSettings
from broker_server.async_ledger import LATE_SETTING, AsyncLedger, empty_buffer
from broker_server.async_results import rebase_buffers
from broker_server.fedbuff import Accepted, BufferResult, FedBuff, IssuedTask, Rejected
from broker_server.journal import RoundJournal
from broker_server.rounds import RoundState
from broker_server.selection import Dropped, route_late_update
from edge_agent.errors import StorageError
from edge_agent.protocol.binding import TaskBinding
from edge_agent.protocol.manifest import ROLE_PARAMETER, TensorSpec
from edge_agent.protocol.messages import UpdateMessage

__all__ = ["LateUpdates", "combine"]

log = logging.getLogger("fedflock.server")

Tensors = dict[str, np.ndarray]
#: a late buffer never seals by itself: the round that completes takes what is pending
_NEVER = 2**62


def combine(round_mean: Mapping[str, np.ndarray], round_weight: float, late: BufferResult) -> Tensors:
    """``(W_r·m_r + W_l·m_l) / (W_r + W_l)``: one weighted mean over both sets of updates."""
    if not (round_weight > 0 and late.total_weight > 0):
        raise ValueError("both means need a positive weight")
    total = round_weight + late.total_weight
    out: Tensors = {}
    for name, value in round_mean.items():
        mixed = value.astype(np.float64) * round_weight + late.mean_delta[name].astype(np.float64) * late.total_weight
        out[name] = (mixed / total).astype(value.dtype)
    return out


class LateUpdates:
    """The pending late updates of a sync server (one per server; ``None`` with ``late_updates="drop"``)."""

    def __init__(
        self,
        settings: AsyncSettings,
        specs: tuple[TensorSpec, ...],
        codecs: frozenset[str],
        *,
        journal: RoundJournal,
        closed: Callable[[], RoundState | None],
    ) -> None:
        self._settings, self._specs, self._codecs = settings, specs, codecs
        self._journal, self._closed = journal, closed
        #: buffers (BatchNorm statistics): rebased, not just added (see the module docstring)
        self._plain = frozenset(spec.name for spec in specs if spec.role != ROLE_PARAMETER)
        #: version -> its plain tensors, for the versions a late update can be based on
        self._history: dict[int, dict[str, np.ndarray]] = {}
        self.buffer = self._new_buffer(0)
        #: late updates folded into a round's aggregate (accepted into the buffer)
        self.accepted = 0

    def _new_buffer(self, version: int) -> FedBuff:
        config = self._settings.fedbuff_config(self._codecs, buffer_size=_NEVER)
        return FedBuff(config, self._specs, version=version, task_of=self._task_of)

    def _task_of(self, task_id: str) -> IssuedTask | None:
        closed = self._closed()
        if closed is None or task_id not in closed.tasks:
            return None
        binding = closed.bindings.get(task_id, TaskBinding())
        return IssuedTask(
            device_id=closed.tasks[task_id], model_version=closed.model_version, round=closed.round, binding=binding
        )

    def resume(self, model_version: int) -> None:
        """Refold the stored pending updates if no stored version includes them yet."""
        self.buffer = self._new_buffer(model_version)
        data = self._journal.load_setting(LATE_SETTING)
        if data is None:
            return
        ledger = AsyncLedger.from_json(data)
        base = ledger.buffer.base_version
        if base > model_version:
            raise StorageError(
                f"stored late updates are based on v{base}, newer than the latest version v{model_version}"
            )
        if base == model_version and ledger.buffer.contributors:
            self.buffer.restore(ledger.buffer)
            log.info("restored %d pending late updates", len(ledger.buffer.contributors))

    def offer(
        self, update: UpdateMessage, closed: RoundState, *, current_version: int
    ) -> Accepted | Rejected | Dropped:
        """Route ``update`` (its round is ``closed``); an accepted one is stored before this returns."""
        outcome = route_late_update(update, closed, policy="async", buffer=self.buffer, current_version=current_version)
        if isinstance(outcome, Accepted):
            self.accepted += 1
            self._save()
            log.info(
                "late update from %s (task %s) kept for the next round: staleness %d, weight %.3g",
                update.device_id,
                update.task_id,
                outcome.staleness,
                outcome.weight,
            )
        return outcome

    def remember(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        """Keep the plain tensors of model ``version`` (``weights``), which late updates may be based on.

        The engine calls it with its model before completing a round: then both the base of a
        straggler's update (the model of the round it missed) and the model its late mean is
        applied to are known when :meth:`take` rebases. Versions too stale to be accepted are forgotten.
        """
        if self._plain:
            self._history[version] = {name: np.array(weights[name]) for name in self._plain}
            self._forget_before(version - self._settings.max_staleness)

    def take(self) -> BufferResult | None:
        """The pending late updates as one sealed buffer (None if there are none), their
        BatchNorm statistics rebased onto the buffer's base version (the model the round applies to)."""
        sealed = self.buffer.flush(partial=True)
        if sealed is None or not self._plain:
            return sealed
        versions = {c.model_version for c in sealed.contributors} | {sealed.base_version}
        known = {v: plain for v in sorted(versions) if (plain := self._plain_at(v)) is not None}
        unknown = sorted(versions - set(known))
        if unknown:
            log.warning(
                "late updates: the weights of v%s are unknown; their BatchNorm statistics are folded uncorrected",
                ", v".join(str(v) for v in unknown),
            )
        self._forget_before(sealed.base_version - self._settings.max_staleness)
        current = known.get(sealed.base_version)
        if current is None:
            return sealed
        return dataclasses.replace(sealed, mean_delta=rebase_buffers(sealed, current, known, self._plain))

    def _forget_before(self, oldest: int) -> None:
        for version in [v for v in self._history if v < oldest]:
            del self._history[version]

    def _plain_at(self, version: int) -> dict[str, np.ndarray] | None:
        """``version``'s plain tensors: remembered, or read from the server store (None: unknown)."""
        plain = self._history.get(version)
        store = self._journal.store
        if plain is None and store is not None:
            row = store.get_model_version(version)
            if row is not None and row.weights is not None:
                plain = {name: np.array(row.weights[name]) for name in self._plain}
                self._history[version] = plain
        return plain

    def committed(self, version: int) -> None:
        """The round that took them stored ``version``: the ledger restarts empty on it."""
        self._journal.save_setting(LATE_SETTING, AsyncLedger(buffer=empty_buffer(version)).to_json())

    def _save(self) -> None:
        self._journal.save_setting(LATE_SETTING, AsyncLedger(buffer=self.buffer.snapshot()).to_json())
