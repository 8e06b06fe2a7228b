"""SECAGG envelopes in the server's dispatcher and round engine (secure aggregation, docs/secagg.md).

:class:`SecAggDispatcher` is the :class:`~broker_server.dispatch.Dispatcher` that also hands
SECAGG messages (on a device's ``results`` topic only) to the open session; :class:`SecAggEngine`
is the part of :class:`~broker_server.round_engine.RoundEngine` that closes a secure round
(:mod:`broker_server.secagg_round`) and refuses plain UPDATEs while secure aggregation is on (the
server must never hold an individual update). Both are split off to keep those modules small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from broker_server.dispatch import Dispatcher
from broker_server.journal import RoundJournal
from broker_server.round_routing import ResultRouting
from broker_server.rounds import RoundState
from broker_server.secagg_round import SecAggOutcome, SecAggRounds
from broker_server.server_config import RoundResult
from edge_agent.errors import ContractViolation, ProtocolError
from edge_agent.protocol.messages import ErrorMessage, SecAggMessage, UpdateMessage
from edge_agent.protocol.topics import RESULTS
from edge_agent.transfer import TransferLink

if TYPE_CHECKING:
    from broker_server.round_engine import LiveRound

__all__ = ["SecAggDispatcher", "SecAggEngine"]


class SecAggDispatcher(Dispatcher):
    """A :class:`Dispatcher` that routes SECAGG messages to ``on_secagg`` (None: refused)."""

    def __init__(self, *args: Any, on_secagg: Callable[[SecAggMessage], None] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_secagg = on_secagg

    def _dispatch(self, kind: str, message: object) -> None:
        if isinstance(message, SecAggMessage):
            if kind != RESULTS or self._on_secagg is None:
                raise ProtocolError(f"SECAGG is not valid on a {kind} topic of this server (secure aggregation off)")
            self._on_secagg(message)
            return
        super()._dispatch(kind, message)


class SecAggEngine(ResultRouting):
    """Secure rounds for the engine that inherits this (it owns the attributes declared here)."""

    secagg: SecAggRounds | None
    _link: TransferLink
    _downloads: list[str]

    def on_result(self, message: UpdateMessage | ErrorMessage) -> bool:
        if self.secagg is not None and isinstance(message, UpdateMessage):
            raise ContractViolation("secure aggregation is on: plain UPDATEs are refused (send the masked input)")
        return super().on_result(message)

    def _secagg_close(self, live: LiveRound, secagg: SecAggRounds) -> RoundResult:
        """Run the open round's session; complete the round with its sum, or abandon it."""
        self.current, state = live, live.state
        try:
            outcome = secagg.collect(state, deadline=live.deadline)
        finally:
            self.current, self.closed = None, state
            for transfer in self._downloads:
                self._link.forget(transfer)
            self._downloads.clear()
        if isinstance(outcome, str):
            self._journal.abandoned(state.round, outcome)
            return self._result(state.round, state, live.started, completed=False, reason=outcome)
        return self._complete(live, outcome)

    def _secagg_resume(self, journal: RoundJournal, state: RoundState) -> str:
        return SecAggRounds.unresumable(journal, state.round, self.secagg is not None)

    @staticmethod
    def _secagg_counts(result: RoundResult, outcome: SecAggOutcome | None) -> RoundResult:
        if outcome is None:
            return result
        return replace(result, reported=outcome.survivors, num_examples=outcome.total_examples)

    if TYPE_CHECKING:  # provided by the engine

        def _result(
            self, number: int, state: RoundState | None, started: float, *, completed: bool, reason: str = ""
        ) -> RoundResult: ...

        def _complete(self, live: LiveRound, secagg: SecAggOutcome | None = None) -> RoundResult: ...
