"""Errors of the differential-privacy package (part of fedflock's tree, see :mod:`edge_agent.errors`)::

    FedflockError
    └── PrivacyError                central DP cannot do what was asked
        └── BudgetExhausted         the next round would spend more than the (ε, δ) budget

Configuration mistakes are :class:`edge_agent.errors.ConfigError` naming the key; caller bugs
(wrong shapes, negative counts) stay ``ValueError``.
"""

from __future__ import annotations

from edge_agent.errors import FedflockError


class PrivacyError(FedflockError):
    code = "privacy_error"


class BudgetExhausted(PrivacyError):
    """Nothing was released: the round would have passed the privacy budget. Stop training."""

    code = "privacy_budget_exhausted"
