"""Device side of a model rollout: MODEL announcement -> FETCH -> chunked download -> install.

:class:`ModelUpdater` is pure of MQTT: it is handed decoded messages and returns the envelopes to
publish, all of them on the device's ``results`` topic (:attr:`ModelUpdater.results_topic`) at
QoS 1. The caller (the agent) subscribes to :attr:`ModelUpdater.channel_topic`, and:

* hands every decoded message for which :meth:`~ModelUpdater.accepts` holds to
  :meth:`~ModelUpdater.handle` *before* its own routing (a model CHUNK must never reach the TASK
  reassembly), publishing the returned envelope; ``handle`` dispatches a MODEL to
  :meth:`~ModelUpdater.announced`, a model CHUNK to :meth:`~ModelUpdater.on_chunk` and an ERROR
  about a FETCH to :meth:`~ModelUpdater.on_error`;
* every scheduling tick publishes :meth:`~ModelUpdater.due_fetch` (given the gate's "download"
  decision) when it returns an envelope.

Flow and decisions (docs/protocol.md §8.5):

* An announcement is remembered (*pending*) if it is for our channel, newer than the installed
  version, of another digest, not refused before, and its ``archive_size`` is within
  ``max_archive_bytes`` (nothing is allocated from declared sizes: the staging file grows chunk by
  chunk). A later announcement replaces a pending one (the channel's latest word counts).
* A *directed* MODEL (``channel`` = the device id, retained on the device's inbox by a staged
  rollout) overrides the channel from then on and may name an older version: a server-ordered
  rollback installs it with ``allow_downgrade``. Refusals hold for it too.
* FETCH is re-sent only after ``fetch_timeout_s`` without a stored chunk, the wait doubling (up to
  ``max_backoff_s``) while FETCHes go unanswered.
* A server with a blob store may answer the FETCH with a CLAIM reference (:mod:`.claimed_download`).
* Chunks are staged on disk (:class:`DownloadStaging`, keyed by the ``task_id`` ``model-v<N>``), so
  a restarted device resumes: its first ack says ``next = k`` and the server skips ahead.
* A complete download whose sha256 differs from the announcement is discarded (stage
  ``"download"``, code ``integrity_error``): a *transient* failure, retried with backoff, given up
  for this process after ``max_attempts``. An archive that verifies but does not install (bad
  tar, wrong bundle digest, validation fails) is *refused* for good (:mod:`.refusals`, on disk).
  A rollback refuses the rolled-back version too (the retained announcement would re-install it).
* A successful install's report carries the validation metrics of the new model and of the one
  it replaced, measured on the same rows (:mod:`.validation`).
* With ``config.trusted_keys`` (issue #7) a MODEL must pass :mod:`.release_gate` first (signature,
  expiry against the model store's wall clock, replay, downgrade); a refused one changes nothing
  and :meth:`~ModelUpdater.handle` may return its report. A bad ``manifest.sig`` gives the archive
  up until restart (it may come back re-signed). The pending statement re-signed by the server (a
  later expiry, :func:`~.authority.same_release`) replaces it without disturbing the download.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edge_agent.errors import (
    ConfigError,
    ContractViolation,
    FedflockError,
    IntegrityError,
    ProtocolError,
    StorageError,
)
from edge_agent.ota import staging as disk
from edge_agent.ota.authority import ReleaseAuthority, same_release
from edge_agent.ota.claimed_download import ClaimedDownloads, ClaimReference
from edge_agent.ota.refusals import REFUSED_FILE, RefusedModels
from edge_agent.ota.release_gate import ReleaseGate
from edge_agent.ota.reports import InstallReport
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import ModelStore
from edge_agent.ota.updater_config import UpdaterConfig
from edge_agent.ota.validation import Validate, replaced_model_metrics
from edge_agent.protocol.chunks import chunk_problem
from edge_agent.protocol.messages import (
    ACK_COMPLETE,
    ACK_OK,
    ACK_REJECTED,
    ACK_RESEND,
    ChunkAck,
    ChunkMessage,
    ErrorMessage,
    Message,
    encode_message,
)
from edge_agent.protocol.model_messages import FetchMessage, ModelMessage, model_object_id, model_object_version
from edge_agent.protocol.topics import Topics

__all__ = ["DOWNLOAD_STAGE", "REFUSED_FILE", "ModelUpdater", "UpdaterConfig"]

_log = logging.getLogger("fedflock.ota")

#: The :class:`InstallReport` stage of a download that failed before the install began.
DOWNLOAD_STAGE = "download"
_STAGED_MODEL = re.compile(r"^model-v[1-9][0-9]*$")


class ModelUpdater(ClaimedDownloads):
    """Downloads and installs announced bundles into ``store``; see the module docstring.

    ``validate(bundle)`` is the install's smoke test (e.g. one evaluation batch). ``clock`` is
    monotonic (fetch timing). Not thread-safe: call it from the agent's loop only.
    """

    def __init__(
        self,
        device_id: str,
        topics: Topics,
        store: ModelStore,
        staging: DownloadStaging,
        validate: Validate,
        *,
        config: UpdaterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id, self.topics, self.config = device_id, topics, config or UpdaterConfig()
        self.store, self.staging = store, staging
        self._validate, self._clock = validate, clock
        self._pending: ModelMessage | None = None
        self._next_fetch_at = -math.inf
        self._unanswered = 0  # FETCHes since the last stored chunk
        self._failures = 0  # transient failures of the pending announcement
        self._staged: tuple[str, int, str] | None = None  # (object id, chunk size, sha256) begun here
        self._installed: tuple[str, str] | None = None  # (object id, sha256) of the last install
        self._given_up: set[tuple[int, str]] = set()  # transient failures, for this process only
        self._refused = RefusedModels(staging.root, device_id)  # read on first use (no I/O here)
        self._channel_model: ModelMessage | None = None  # the channel's latest announcement
        self._directed: ModelMessage | None = None  # the server's word for this device (inbox)
        self._gate = ReleaseGate(self.config.trusted_keys, ReleaseAuthority(staging.root, device_id), store.clock)
        self._bad_signatures: set[str] = set()  # archive sha256s whose bundle signature failed
        self._new_refusal: InstallReport | None = None  # set by announced(), returned by handle()
        if self.config.channel == device_id:
            raise ConfigError(f"model channel {device_id!r} is reserved for MODELs directed at that device")

    @property
    def channel_topic(self) -> str:
        """Subscribe to this (retained MODEL announcements of our channel)."""
        return self.topics.model_channel(self.config.channel)

    @property
    def results_topic(self) -> str:
        """Publish every envelope this class returns here, QoS 1."""
        return self.topics.results(self.device_id)

    @property
    def pending(self) -> ModelMessage | None:
        """The announcement being fetched, if any."""
        return self._pending

    def accepts(self, message: Message) -> bool:
        """Whether ``message`` is the updater's: a MODEL, or a model CHUNK or FETCH ERROR for us."""
        if isinstance(message, ModelMessage):
            return True
        if isinstance(message, ChunkMessage | ErrorMessage | ClaimReference) and message.device_id == self.device_id:
            return message.round == -1 and model_object_version(message.task_id) is not None
        return False

    def handle(self, message: Message, *, may_download: bool = True) -> tuple[bytes | None, InstallReport | None]:
        """Dispatch a message :meth:`accepts`; returns (envelope to publish, install report)."""
        if isinstance(message, ModelMessage):
            self.announced(message)
            report, self._new_refusal = self._new_refusal, None
            return None, report
        if isinstance(message, ChunkMessage):
            return self.on_chunk(message, may_download=may_download)
        if isinstance(message, ErrorMessage):
            self.on_error(message)
            return None, None
        if isinstance(message, ClaimReference):  # the archive by claim check (edge_agent.ota.claimed_download)
            return self.on_claim(message, may_download=may_download)
        raise ValueError(f"{type(message).__name__} is not for the model updater")

    def announced(self, model: ModelMessage) -> bool:
        """Remember ``model`` if it should be installed; returns whether it is pending now.

        A MODEL whose channel is this device's id is *directed* (the server's word for this
        device, retained on its inbox): it overrides the channel's announcements and may name an
        older version (a server-ordered rollback). A channel announcement only upgrades.
        """
        directed = model.channel == self.device_id
        if not directed and model.channel != self.config.channel:
            _log.info("%s: ignoring model v%d: channel %r is not ours", self.device_id, model.version, model.channel)
            return False
        refusal = self._gate.refusal(model, directed=directed, installed=self.store.current())
        if refusal is not None:
            self._new_refusal = self._gate.refused(model, refusal, device_id=self.device_id, at=self.store.clock())
            return False
        self._gate.accept(model, directed=directed)
        if directed:
            self._directed = model
        else:
            self._channel_model = model
            if self._directed is not None:
                _log.info("%s: model v%d of the channel: a directed target overrides it", self.device_id, model.version)
                return False
        why_not = self._why_not(model, directed=model is self._directed)
        if why_not is not None:
            _log.info("%s: ignoring model v%d: %s", self.device_id, model.version, why_not)
            if model is self._directed:
                self._pending = None  # the server's word replaces any channel download
            return False
        if same_release(model, self._pending):  # the same statement re-signed (a later expiry): go on
            self._pending = model
        else:
            _log.info("%s: model v%d (%s) announced", self.device_id, model.version, model.bundle_digest[:12])
            self._pending, self._failures, self._unanswered, self._next_fetch_at = model, 0, 0, -math.inf
            self._discard_stale_downloads(keep=model_object_id(model.version))
        return True

    def _why_not(self, model: ModelMessage, *, directed: bool) -> str | None:
        current, key = self.store.current(), (model.version, model.bundle_digest)
        if current is not None and (
            model.bundle_digest == current.digest or (model.version <= current.version and not directed)
        ):
            return f"version {current.version} ({current.digest[:12]}) is installed"
        if key in self._given_up or key in self._refused:
            return "it was refused before"
        if model.archive_sha256 in self._bad_signatures:
            return "its bundle signature failed before (until restart)"
        if model.archive_size > (limit := min(self.config.max_archive_bytes, self.staging.max_bytes)):
            return f"its archive of {model.archive_size} bytes exceeds the limit of {limit}"
        return None

    def due_fetch(self, may_download: bool) -> bytes | None:
        """The FETCH envelope to publish now, if one is due and the gate allows downloads."""
        model = self._pending
        now = self._clock()
        if model is None or not may_download or now < self._next_fetch_at:
            return None
        wait = min(self.config.fetch_timeout_s * 2**self._unanswered, self.config.max_backoff_s)
        self._unanswered += 1
        self._next_fetch_at = now + wait
        fetch = FetchMessage(
            device_id=self.device_id, channel=model.channel, version=model.version, chunk_size=self.config.chunk_size
        )
        return encode_message(fetch)

    def on_chunk(self, chunk: ChunkMessage, *, may_download: bool = True) -> tuple[bytes | None, InstallReport | None]:
        """Stage one chunk of a model download; returns (CHUNK_ACK envelope, install report).

        The report is set once the download finished: installed (``ok``) or why not. With
        ``may_download`` false nothing is stored and the transfer is rejected ("paused"); the
        next allowed :meth:`due_fetch` resumes it. Only chunks for which ``is_model_transfer``
        holds belong here (ValueError otherwise); chunks for another device are ignored.
        """
        version = model_object_version(chunk.task_id)
        if chunk.round != -1 or version is None:
            raise ValueError(f"chunk of task {chunk.task_id!r} (round {chunk.round}) is not a model download")
        if chunk.device_id != self.device_id:
            _log.warning("%s: ignoring a model chunk addressed to %s", self.device_id, chunk.device_id)
            return None, None
        if self._installed == (chunk.task_id, chunk.sha256):  # a re-sent last chunk: our COMPLETE was lost
            return self._ack(chunk, chunk.count, ACK_COMPLETE), None
        model = self._pending
        wanted = (model.version, model.archive_sha256, model.archive_size) if model is not None else None
        if model is None or wanted != (version, chunk.sha256, chunk.total_size):
            # a superseded or given-up download, or an archive unlike the announcement
            return self._ack(chunk, 0, ACK_REJECTED, "not the announced model archive"), None
        if (problem := chunk_problem(chunk)) is not None:
            return self._ack(chunk, 0, ACK_REJECTED, f"malformed chunk: {problem}"), None
        if not may_download:  # stop the server; FETCH again (resuming) as soon as the gate allows
            self._unanswered, self._next_fetch_at = 0, -math.inf
            return self._ack(chunk, 0, ACK_REJECTED, "download paused by the device's policy"), None
        try:
            held = self._begin(chunk)
            if chunk.index == held:
                held = self.staging.write_chunk(chunk.task_id, chunk.index, chunk.data)
                self._unanswered, self._next_fetch_at = 0, self._clock() + self.config.fetch_timeout_s
            elif held < chunk.count:  # a duplicate (or the resume: the sender skips to ``held``) or a gap
                status, reason = (ACK_OK, "") if chunk.index < held else (ACK_RESEND, f"out of order: expected {held}")
                return self._ack(chunk, held, status, reason), None
        except (StorageError, ContractViolation) as exc:
            self._staged = None
            return self._ack(chunk, 0, ACK_REJECTED, exc.reason), self._failed(model, exc, transient=True)
        if held < chunk.count:
            return self._ack(chunk, held, ACK_OK), None
        # every chunk is staged (also when a restart came between the last chunk and the install)
        report = self._install(model, chunk.task_id)
        if report.ok:
            return self._ack(chunk, chunk.count, ACK_COMPLETE), report
        return self._ack(chunk, 0, ACK_REJECTED, f"not installed ({report.stage}): {report.reason}"), report

    def on_error(self, error: ErrorMessage) -> bool:
        """An ERROR from the server about our FETCH (e.g. it does not hold the version): back off.

        Returns whether the error concerned the pending download.
        """
        model = self._pending
        if model is None or error.round != -1 or model_object_version(error.task_id) != model.version:
            return False
        _log.warning(
            "%s: server refused FETCH of v%d (%s): %s", self.device_id, model.version, error.code, error.reason
        )
        self._failed(model, ProtocolError(f"server: {error.code}: {error.reason}"), transient=True)
        return True

    def rollback(self, reason: str) -> InstallReport:
        """Return to the previous model (e.g. training the new one gives a non-finite loss).

        The rolled-back (version, digest) is refused from now on, across restarts.
        """
        bad = self.store.current()
        report = self.store.rollback(reason)
        if report.ok and bad is not None:
            self._refused.add((bad.version, bad.digest))
            if self._pending is not None and self._pending.version <= bad.version:
                self._pending = None
        return report

    # -- internals -------------------------------------------------------------------------

    def _begin(self, chunk: ChunkMessage) -> int:
        """Start or resume staging the object (once per process and chunk size); the next index."""
        staged = (chunk.task_id, chunk.chunk_size, chunk.sha256)
        if self._staged != staged:
            held = self.staging.begin(chunk.task_id, chunk.total_size, chunk.chunk_size, chunk.sha256)
            self._staged = staged
            return held
        return self.staging.next_index(chunk.task_id)

    def _install(self, model: ModelMessage, object_id: str, staged: Path | None = None) -> InstallReport:
        self._staged = None
        try:  # a claimed download is ``staged`` verified; chunks: sha256 of the whole, discarded on mismatch
            path = staged or self.staging.finish(object_id)
        except (IntegrityError, StorageError, ContractViolation) as exc:
            return self._failed(model, exc, transient=True)
        report = self.store.install(
            model.version,
            path,
            expected_digest=model.bundle_digest,
            validate=self._validate,
            verify=self._gate.verify_bundle,
            allow_downgrade=model.channel == self.device_id,
            issued_at=model.issued_at,
        )
        try:
            self.staging.discard(object_id)
        except StorageError as exc:
            _log.warning("%s: cannot remove the staged download %s: %s", self.device_id, object_id, exc.reason)
        if report.ok:
            self._pending, self._installed = None, (object_id, model.archive_sha256)
            previous = replaced_model_metrics(self.store.previous(), self._validate, device_id=self.device_id)
            return replace(report, previous_metrics=previous)
        transient = report.code == StorageError.code
        if report.stage == "signature":  # not for good: it may come back signed by a trusted key
            self._bad_signatures.add(model.archive_sha256)
        elif not transient:
            self._refused.add((model.version, model.bundle_digest))
        self._pending_failed(model, transient)
        return report

    def _failed(self, model: ModelMessage, exc: FedflockError, *, transient: bool) -> InstallReport:
        _log.warning("%s: download of model v%d failed (%s): %s", self.device_id, model.version, exc.code, exc.reason)
        self._pending_failed(model, transient)
        return InstallReport(
            ok=False,
            version=model.version,
            stage=DOWNLOAD_STAGE,
            reason=exc.reason,
            code=exc.code,
            digest=model.bundle_digest,
            at=self.store.clock(),
        )

    def _pending_failed(self, model: ModelMessage, transient: bool) -> None:
        if self._pending != model:
            return
        self._failures += 1
        if not transient or self._failures >= self.config.max_attempts:
            if transient:
                self._given_up.add((model.version, model.bundle_digest))
            _log.warning("%s: giving up on model v%d", self.device_id, model.version)
            self._pending = None
            return
        wait = min(self.config.fetch_timeout_s * 2 ** (self._failures - 1), self.config.max_backoff_s)
        self._unanswered, self._next_fetch_at = 0, self._clock() + wait

    def _discard_stale_downloads(self, *, keep: str) -> None:
        """Remove staged downloads of models other than ``keep`` (superseded announcements)."""
        if not self.staging.root.is_dir():
            return
        try:
            for sidecar in disk.list_directory(self.staging.root):
                stem = sidecar.name.removesuffix(".json")
                if sidecar.name.endswith(".json") and _STAGED_MODEL.match(stem) and stem != keep:
                    _log.info("%s: discarding the superseded download %s", self.device_id, stem)
                    self.staging.discard(stem)
        except StorageError as exc:
            _log.warning("%s: cannot clean superseded downloads: %s", self.device_id, exc.reason)

    def _ack(self, chunk: ChunkMessage, next_: int, status: str, reason: str = "") -> bytes:
        ack = ChunkAck(
            device_id=self.device_id,
            round=chunk.round,
            task_id=chunk.task_id,
            transfer_id=chunk.transfer_id,
            next=next_,
            status=status,
            reason=reason,
        )
        return encode_message(ack)
