"""Errors raised by the robust-aggregation package (part of fedflock's tree, see :mod:`edge_agent.errors`)::

    FedflockError
    └── RobustAggregationError      a robust rule or the update buffer cannot do what was asked
        ├── BufferFull              the round's update buffer is at its row or byte cap
        └── NotEnoughUpdates        too few updates for the rule (Krum: n > 2f + 2; trimmed mean: n > 2k)

Caller bugs (wrong shapes, non-positive weights, a device added twice) stay ``ValueError``.
"""

from __future__ import annotations

from edge_agent.errors import FedflockError


class RobustAggregationError(FedflockError):
    code = "robust_aggregation_error"


class BufferFull(RobustAggregationError):
    """The update was refused; the buffer's contents are unchanged."""

    code = "buffer_full"


class NotEnoughUpdates(RobustAggregationError):
    """The round has too few updates for the configured rule (fall back or abandon the round)."""

    code = "not_enough_updates"
