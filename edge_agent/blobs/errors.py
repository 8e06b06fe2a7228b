"""Blob store and claim-check errors, translated from HTTP statuses and OS errors at the boundary.

::

    FedflockError
    └── BlobError                  a blob store operation failed
        ├── BlobNotFound           no such key (S3 ``NoSuchKey``, HTTP 404)
        ├── BlobAccessDenied       refused: bad signature, policy, unknown key id (HTTP 403)
        │   └── ClaimExpired       a presigned URL or claim reference whose expiry has passed
        ├── BlobIntegrityError     the bytes do not match the declared sha256 or size (S3 ``BadDigest``)
        ├── BlobTooLarge           an object above the receiver's limit (refused before any byte is read)
        └── BlobUnavailable        the store could not be reached or failed (5xx, reset): transient, retry
    ProtocolError
    └── ClaimRefused               a receiver refuses a CLAIM reference (the dispatcher records it)

Only :class:`BlobUnavailable` is worth retrying as is; the others need a new URL, a new upload or
another route (the device falls back to chunked MQTT).
"""

from __future__ import annotations

from edge_agent.errors import FedflockError, ProtocolError

__all__ = [
    "BlobAccessDenied",
    "BlobError",
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobTooLarge",
    "BlobUnavailable",
    "ClaimExpired",
    "ClaimRefused",
]


class BlobError(FedflockError):
    code = "blob_error"


class BlobNotFound(BlobError):
    code = "blob_not_found"


class BlobAccessDenied(BlobError):
    code = "blob_access_denied"


class ClaimExpired(BlobAccessDenied):
    code = "claim_expired"


class BlobIntegrityError(BlobError):
    code = "blob_integrity"


class BlobTooLarge(BlobError):
    code = "blob_too_large"


class BlobUnavailable(BlobError):
    code = "blob_unavailable"


class ClaimRefused(ProtocolError):
    """A CLAIM reference the receiver cannot use; ``reason`` starts with the blob error's code."""

    code = "claim_refused"
