"""Where a device's UPDATE or ERROR goes: the open round, the round that just closed, or nowhere.

:class:`ResultRouting` is the result half of :class:`~broker_server.round_engine.RoundEngine`
(split off to keep that module small): a result for the round being collected is accepted
(and journaled) there; one for the round that closed last is *late* — dropped (counted in
``late_updates``) or, with ``late_updates = "async"``, offered to
:class:`~broker_server.late_updates.LateUpdates`; anything else is refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker_server.fedbuff import Rejected
from broker_server.journal import RoundJournal
from broker_server.late_updates import LateUpdates
from broker_server.rounds import RoundState, other_round
from broker_server.safeguards import Safeguards
from broker_server.selection import Dropped, route_late_update
from edge_agent.errors import ContractViolation
from edge_agent.protocol.messages import ErrorMessage, UpdateMessage

if TYPE_CHECKING:
    from broker_server.round_engine import LiveRound

__all__ = ["ResultRouting"]

log = logging.getLogger("fedflock.server")


class ResultRouting:
    """Routes results; the engine that inherits this owns the attributes declared here."""

    current: LiveRound | None
    closed: RoundState | None
    late: LateUpdates | None
    late_updates: int
    model_version: int
    safeguards: Safeguards
    _journal: RoundJournal

    def on_result(self, message: UpdateMessage | ErrorMessage) -> bool:
        """An UPDATE or ERROR from a device; True when an update was counted (a round's or the
        late-update buffer's); raises ProtocolError for one that is not acceptable."""
        self.safeguards.admit(message.device_id)  # Quarantined (with its reason) from a quarantined device
        live, closed = self.current, self.closed
        if live is not None and message.round == live.state.round:
            return self._accept(live.state, message)
        if closed is not None and message.round == closed.round:
            return self._late(message, closed)
        if live is not None:
            return self._accept(live.state, message)  # ContractViolation for another round's result
        raise other_round(message.round, closed.round + 1 if closed is not None else 0)  # no round open

    def _accept(self, state: RoundState, message: UpdateMessage | ErrorMessage) -> bool:
        if isinstance(message, UpdateMessage):
            if not state.accept_update(message):
                log.info("duplicate update for task %s from %s ignored", message.task_id, message.device_id)
                return False
            self._journal.accepted(state, message)
            return True
        else:
            if not state.record_error(message):
                return False
            self._journal.failed(state, message)
            log.warning(
                "device %s failed task %s (%s): %s", message.device_id, message.task_id, message.code, message.reason
            )
            return False

    def _late(self, message: UpdateMessage | ErrorMessage, closed: RoundState) -> bool:
        """True when a late update joined the late-update buffer (``late_updates = "async"``)."""
        if not closed.check_late(message):  # binding refused, or Replayed for a counted update
            log.info("duplicate result for task %s from %s ignored", message.task_id, message.device_id)
        elif isinstance(message, UpdateMessage):
            if self.late is not None:
                outcome = self.late.offer(message, closed, current_version=self.model_version)
            else:
                outcome = route_late_update(message, closed, policy="drop")
            if isinstance(outcome, Rejected):
                raise ContractViolation(f"late update refused ({outcome.reason}): {outcome.detail}")
            if isinstance(outcome, Dropped):
                self.late_updates += 1
                log.info("late update from %s: %s", message.device_id, outcome.reason)
                return False
            return True
        else:
            log.info("late error from %s for task %s: %s", message.device_id, message.task_id, message.reason)
        return False
