"""Blob stores and claim checks (issue 9): large models and updates out of MQTT (docs/blobs.md).

Device-owned contract, standard library only: :mod:`.store` (the :class:`BlobStore` port),
:mod:`.local` (filesystem), :mod:`.s3` (S3-compatible, :mod:`.sigv4` from the spec), :mod:`.urls`
(what a device needs: GET with resume, PUT, digest check), :mod:`.claim` (the decision and
:class:`ClaimCheck`), :mod:`.claim_uploads` (the device's grant -> PUT -> reference -> ack).
"""

from edge_agent.blobs.claim import ClaimCheck, Inline, resolve_url, should_claim_check
from edge_agent.blobs.claim_uploads import CAPABILITY, ClaimUploads
from edge_agent.blobs.errors import (
    BlobAccessDenied,
    BlobError,
    BlobIntegrityError,
    BlobNotFound,
    BlobTooLarge,
    BlobUnavailable,
    ClaimExpired,
    ClaimRefused,
)
from edge_agent.blobs.http import HttpClient
from edge_agent.blobs.keys import check_key, content_key
from edge_agent.blobs.local import LocalBlobStore
from edge_agent.blobs.s3 import S3BlobStore, S3Location
from edge_agent.blobs.sigv4 import Credentials
from edge_agent.blobs.store import BlobInfo, BlobStore
from edge_agent.blobs.urls import download_bytes, download_file, upload

__all__ = [
    "CAPABILITY",
    "BlobAccessDenied",
    "BlobError",
    "BlobInfo",
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobStore",
    "BlobTooLarge",
    "BlobUnavailable",
    "ClaimCheck",
    "ClaimExpired",
    "ClaimRefused",
    "ClaimUploads",
    "Credentials",
    "HttpClient",
    "Inline",
    "LocalBlobStore",
    "S3BlobStore",
    "S3Location",
    "check_key",
    "content_key",
    "download_bytes",
    "download_file",
    "resolve_url",
    "should_claim_check",
    "upload",
]
