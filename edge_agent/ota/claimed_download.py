"""A model archive fetched by claim check: the server answers a FETCH with a CLAIM reference.

When the server has a blob store (``[blobs]``) and the archive is above its threshold, a FETCH
is answered with a :class:`~edge_agent.protocol.claim_messages.ClaimReference` (``kind``
``bundle-archive``, ``round`` -1, ``task_id`` ``model-v<N>``) on the device's ``tasks`` topic
instead of CHUNKs (docs/blobs.md). :class:`ClaimedDownloads` is the part of
:class:`~edge_agent.ota.updater.ModelUpdater` that takes it:

* the reference must describe the pending announcement exactly (version, sha256, size), be
  within the archive limit and not expired — checked before anything is fetched;
* the archive is downloaded over HTTP(S) to ``<staging>/model-v<N>.claim`` (resuming a ``.part``
  after a cut connection or a restart) and its size and sha256 verified before it is used
  (:func:`edge_agent.blobs.download_file`); then installed like a chunked download (the store
  verifies the bundle file by file, validates it, and the release gate checks its signature);
* the server hears a CLAIM ``ack``: ``complete`` after an install, ``retry`` for a transient
  failure (store unreachable, download paused by the device's policy) and ``rejected``
  otherwise. Failures count like a chunked download's (backoff, FETCH again, give up after
  ``max_attempts``); a tampered object fails the digest check and nothing is installed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.blobs import BlobError, BlobUnavailable, HttpClient, download_file
from edge_agent.blobs.claim import check_reference
from edge_agent.errors import FedflockError, StorageError
from edge_agent.ota.reports import InstallReport
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import ModelStore
from edge_agent.ota.updater_config import UpdaterConfig
from edge_agent.protocol.claim_messages import (
    CLAIM_COMPLETE,
    CLAIM_REJECTED,
    CLAIM_RETRY,
    KIND_BUNDLE,
    ClaimAck,
    ClaimReference,
)
from edge_agent.protocol.messages import encode_message
from edge_agent.protocol.model_messages import ModelMessage, model_object_version

__all__ = ["ClaimReference", "ClaimedDownloads"]

_log = logging.getLogger("fedflock.ota")

Outcome = tuple[bytes | None, InstallReport | None]


class ClaimedDownloads:
    """Model archives by claim check, for the updater that inherits this (it owns these attributes)."""

    device_id: str
    config: UpdaterConfig
    store: ModelStore
    staging: DownloadStaging
    _pending: ModelMessage | None
    _unanswered: int
    _next_fetch_at: float
    #: the HTTP client for claimed downloads (tests inject one; None: urllib with its defaults)
    claim_http: HttpClient | None = None

    def on_claim(self, reference: ClaimReference, *, may_download: bool = True) -> Outcome:
        """Download, verify and install the referenced archive; returns (CLAIM ack envelope, report)."""
        model = self._pending
        version = model_object_version(reference.task_id)
        wanted = (model.version, model.archive_sha256, model.archive_size) if model is not None else None
        if model is None or reference.round != -1 or wanted != (version, reference.sha256, reference.size):
            return _ack(reference, CLAIM_REJECTED, "not the announced model archive"), None
        if reference.kind != KIND_BUNDLE or not reference.url:
            return _ack(reference, CLAIM_REJECTED, "a model reference needs kind bundle-archive and a URL"), None
        if not may_download:  # FETCH again (a new reference) as soon as the gate allows
            self._unanswered, self._next_fetch_at = 0, -math.inf
            return _ack(reference, CLAIM_RETRY, "download paused by the device's policy"), None
        target = self.staging.root / f"{reference.task_id}.claim"
        try:
            check_reference(reference, max_bytes=self._archive_limit(), now=self.store.clock())
            path = download_file(
                reference.url, target, size=reference.size, sha256=reference.sha256, http=self.claim_http
            )
        except (BlobError, StorageError) as exc:
            status = CLAIM_RETRY if isinstance(exc, BlobUnavailable) else CLAIM_REJECTED
            if status == CLAIM_REJECTED:
                _discard(target)
            return _ack(reference, status, f"{exc.code}: {exc.reason}"), self._failed(model, exc, transient=True)
        self._unanswered = 0
        try:
            report = self._install(model, reference.task_id, path)
        finally:
            _discard(target)
        if report.ok:
            return _ack(reference, CLAIM_COMPLETE, ""), report
        return _ack(reference, CLAIM_REJECTED, f"not installed ({report.stage}): {report.reason}"), report

    def _archive_limit(self) -> int:
        return min(self.config.max_archive_bytes, self.staging.max_bytes)

    if TYPE_CHECKING:  # provided by the updater

        def _install(self, model: ModelMessage, object_id: str, staged: Path | None = None) -> InstallReport: ...

        def _failed(self, model: ModelMessage, exc: FedflockError, *, transient: bool) -> InstallReport: ...


def _discard(target: Path) -> None:
    for path in (target, target.with_name(target.name + ".part")):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            _log.warning("cannot remove the claimed download %s: %s", path, exc.strerror or exc)


def _ack(reference: ClaimReference, status: str, reason: str) -> bytes:
    ack = ClaimAck(
        device_id=reference.device_id,
        round=reference.round,
        task_id=reference.task_id,
        claim_id=reference.claim_id,
        status=status,
        reason=reason[:500],
    )
    return encode_message(ack)
