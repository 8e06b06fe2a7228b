"""What the server tells an observer (e.g. :class:`broker_server.ops.ServerMetrics`) as it works.

A narrow protocol so the server does not depend on the ops package: the dispatcher reports every
update *counted* (folded into a round's aggregate, a late-update buffer or a FedBuff buffer — not a
duplicate) and every rejected message with its stable error code; the caller reports aggregation
times from :attr:`~broker_server.server_config.RoundResult.aggregation_s`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ServerEvents"]


class ServerEvents(Protocol):
    def update_accepted(self, codec: str, nbytes: int) -> None:
        """An update of ``nbytes`` payload bytes in ``codec`` was counted."""

    def message_rejected(self, reason: str) -> None:
        """A message was refused; ``reason`` is its error code (``FedflockError.code``)."""
