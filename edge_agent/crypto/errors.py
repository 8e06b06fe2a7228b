"""The errors of signed artifacts (issue #7), apart so that :mod:`.trust` and :mod:`.freshness` share them::

IntegrityError (edge_agent.errors)
└── SignatureError               unsigned, signed by a key that is not trusted, or tampered
    └── StaleStatement           signed, but outside its validity window (edge_agent.crypto.freshness)
        ├── StatementExpired
        ├── StatementNotYetValid
        └── StatementWithoutExpiry
"""

from __future__ import annotations

from edge_agent.errors import IntegrityError

__all__ = ["SignatureError"]


class SignatureError(IntegrityError):
    """An artifact that is unsigned, signed by a key that is not trusted, or whose signature does not match."""

    code = "signature_error"
