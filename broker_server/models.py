"""Server side of a model rollout: announce bundle versions, serve their archives on FETCH.

:class:`ModelPublisher` holds the archives (:func:`edge_agent.ota.pack_bundle` bytes) of the
versions it published, announces one per channel with a retained MODEL on
``{prefix}/models/{channel}``, and answers a device's FETCH by sending the archive as CHUNKs on
the device's ``tasks`` topic through the server's :class:`~edge_agent.transfer.TransferLink` (whose
CHUNK_ACKs arrive on the device's ``results`` topic as for any download). Decisions
(docs/protocol.md §8.5):

* every FETCH starts a new transfer (fresh transfer id), and replaces the device's previous model
  transfer (forgotten: at most one per device). The device's first ack names the chunks it has
  staged, so a re-FETCH after a device restart resumes instead of starting over;
* the chunk size is the device's wish, lowered to ``max_chunk_bytes`` (the same wish always gets
  the same size, which a staged download needs to resume);
* a FETCH for a version not held gets an ERROR (code ``contract_violation``, ``round`` -1,
  ``task_id`` ``model-v<N>``) on the device's inbox, and raises :class:`ContractViolation` so
  the server counts the rejection; beyond ``max_transfers`` concurrent transfers a FETCH is
  dropped unanswered (:class:`ProtocolError`; the device asks again after its timeout);
* at most ``keep`` versions stay in memory (announced ones, and those of a rollout, are never
  dropped);
* with claim checks (the server's ``[blobs]`` table, a device announcing ``claim_check``) an
  archive above the threshold is answered by a CLAIM reference (presigned GET) instead of CHUNKs.

With ``rollout`` settings (``ServerConfig.rollout``) the publisher owns a
:class:`~broker_server.rollout_control.RolloutController`: :meth:`ModelPublisher.start_rollout`
moves the channel's devices from the announced version to a new one in stages, FETCHes are
answered only for each device's target version (others get the same ERROR as an unknown
version), :meth:`ModelPublisher.observe` folds STATUS reports in and :meth:`ModelPublisher.tick`
lets soak time count (the dispatcher calls both). A plain :meth:`ModelPublisher.announce` on the
channel is refused while a rollout is active or halted, and ends a finished one.

With a ``signer`` (``[ota] signing_key``, :class:`broker_server.pki.release_signer.ReleaseSigner`)
every MODEL it publishes — channel announcements and directed MODELs — carries a signed release
statement (issue #7, docs/protocol.md §8.5); devices with trusted keys refuse unsigned ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker_server.blob_claims import ServerClaims
from broker_server.persistence.base import ServerStore
from broker_server.rollout import RolloutState
from broker_server.rollout_config import RolloutSettings
from broker_server.rollout_control import RolloutController
from edge_agent.blobs import BlobError, should_claim_check
from edge_agent.errors import ConfigError, ContractViolation, ProtocolError, TransportError
from edge_agent.ota.archive import pack_bundle
from edge_agent.protocol.manifest import load_manifest
from edge_agent.protocol.messages import MIN_CHUNK_BYTES, ErrorMessage, StatusMessage, encode_message
from edge_agent.protocol.model_messages import ROLLOUT_ID_PATTERN, FetchMessage, ModelMessage, model_object_id
from edge_agent.protocol.topics import Topics
from edge_agent.transfer import DONE, SENDING, TransferLink
from edge_agent.transport.base import Transport

__all__ = ["ModelPublisher", "Release", "SignRelease"]

#: stamps and signs a MODEL (``ReleaseSigner.sign``)
SignRelease = Callable[[ModelMessage], ModelMessage]

log = logging.getLogger("fedflock.server.models")


@dataclass(frozen=True, eq=False)
class Release:
    """One bundle version as served: its archive bytes and the digests announced for it."""

    version: int
    bundle_digest: str
    archive: bytes
    archive_sha256: str

    def announcement(self, channel: str, signature: str = "") -> ModelMessage:
        return ModelMessage(
            channel=channel,
            version=self.version,
            bundle_digest=self.bundle_digest,
            archive_sha256=self.archive_sha256,
            archive_size=len(self.archive),
            signature=signature,
        )


class ModelPublisher:
    """Announced bundle versions and the transfers serving them; single-threaded (the server's loop)."""

    def __init__(
        self,
        topics: Topics,
        *,
        max_chunk_bytes: int = 256 * 1024,
        keep: int = 4,
        max_transfers: int = 64,
        rollout: RolloutSettings | None = None,
        store: ServerStore | None = None,
        clock: Callable[[], float] = time.time,
        signer: SignRelease | None = None,
    ) -> None:
        """``rollout``: staged rollouts on ``rollout.channel`` (None: every device gets the announced
        version); ``store`` keeps the rollout across restarts; ``clock`` is wall time (soak);
        ``signer`` signs every MODEL published (None: unsigned)."""
        if max_chunk_bytes < MIN_CHUNK_BYTES or keep < 1 or max_transfers < 1:
            raise ConfigError(f"need max_chunk_bytes >= {MIN_CHUNK_BYTES}, keep >= 1 and max_transfers >= 1")
        self.topics = topics
        self.max_chunk_bytes, self.keep, self.max_transfers = max_chunk_bytes, keep, max_transfers
        self.signer = signer
        #: fetches served, replaced, refused (metrics)
        self.counters: Counter[str] = Counter()
        self._releases: dict[int, Release] = {}
        self._channels: dict[str, int] = {}  # channel -> announced version
        self._transfers: dict[str, str] = {}  # device id -> transfer id of its model download
        self._dirs: dict[int, str] = {}  # version -> bundle directory it was added from
        self._republish: str | None = None  # a channel to announce again after loading a rollout
        self.rollout: RolloutController | None = None
        if rollout is not None:
            self.rollout = RolloutController(
                rollout, topics, self, clock=clock, store=store, on_complete=self._completed
            )

    def sign_with(self, signer: SignRelease | None) -> None:
        """Sign every MODEL published from now on (set before the server starts)."""
        self.signer = signer

    def _signed(self, message: ModelMessage) -> ModelMessage:
        return self.signer(message) if self.signer is not None else message

    def add(self, version: int, bundle_dir: str | Path) -> Release:
        """Pack ``bundle_dir`` as ``version`` (files are verified against the manifest first)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"model version must be an integer >= 1, got {version!r}")
        _, digest = load_manifest(bundle_dir, verify=True)
        held = self._releases.get(version)
        if held is not None and held.bundle_digest != digest:
            raise ConfigError(f"version {version} is already published with bundle {held.bundle_digest[:12]}")
        archive = pack_bundle(bundle_dir)
        release = Release(version, digest, archive, hashlib.sha256(archive).hexdigest())
        self._releases[version] = release
        self._dirs[version] = str(Path(bundle_dir).resolve())
        self._prune(also_keep=version)
        return release

    def announce(
        self,
        transport: Transport,
        channel: str,
        version: int,
        bundle_dir: str | Path | None = None,
        signature: str = "",
    ) -> ModelMessage:
        """Publish the retained MODEL for ``version`` on ``channel`` (adding ``bundle_dir`` first if given)."""
        self._ensure_loaded()
        controller = self.rollout if self.rollout is not None and self.rollout.channel == channel else None
        if controller is not None and controller.running:
            raise ConfigError(f"channel {channel!r} has a rollout running; its controller decides what devices run")
        message = self._publish_channel(transport, channel, version, bundle_dir, signature)
        if controller is not None and controller.state is not None:
            controller.retire(transport, version)
        return message

    def _publish_channel(
        self, transport: Transport, channel: str, version: int, bundle_dir: str | Path | None, signature: str = ""
    ) -> ModelMessage:
        topic = self.topics.model_channel(channel)  # raises ConfigError for a bad channel name
        release = self.add(version, bundle_dir) if bundle_dir is not None else self._releases.get(version)
        if release is None:
            raise ConfigError(f"model version {version} is not held; give its bundle directory")
        message = self._signed(release.announcement(channel, signature))
        transport.publish(topic, encode_message(message), qos=1, retain=True)
        self._channels[channel] = version
        self._prune()
        log.info("announced model v%d (%s) on channel %s", version, release.bundle_digest[:12], channel)
        return message

    def announced(self, channel: str) -> int | None:
        """The version announced on ``channel`` by this publisher, if any."""
        self._ensure_loaded()
        return self._channels.get(channel)

    def release(self, version: int) -> Release | None:
        return self._releases.get(version)

    def digest_of(self, version: int) -> str | None:
        release = self._releases.get(version)
        return release.bundle_digest if release is not None else None

    def announcement_of(self, version: int, channel: str, rollout_id: str = "") -> ModelMessage | None:
        """The MODEL for ``version`` on ``channel`` (a device id: directed), signed when there is a signer."""
        release = self._releases.get(version)
        if release is None:
            return None
        return self._signed(dataclasses.replace(release.announcement(channel), rollout_id=rollout_id))

    # -- staged rollout ----------------------------------------------------------------------------

    def start_rollout(
        self,
        transport: Transport,
        version: int,
        bundle_dir: str | Path | None = None,
        *,
        baseline: int | None = None,
        rollout_id: str = "",
    ) -> RolloutState:
        """Move the rollout channel's devices from ``baseline`` (default: the version announced
        there) to ``version`` in the configured stages; the channel keeps announcing the baseline."""
        controller = self._controller()
        if not ROLLOUT_ID_PATTERN.match(rollout_id):  # it travels in (and is signed with) directed MODELs
            raise ConfigError(f"rollout id {rollout_id[:40]!r}: printable ASCII without spaces, at most 128")
        if bundle_dir is not None:
            self.add(version, bundle_dir)
        baseline = baseline if baseline is not None else self._channels.get(controller.channel)
        if baseline is None:
            raise ConfigError(f"nothing is announced on channel {controller.channel!r}: give the baseline version")
        missing = [v for v in (version, baseline) if v not in self._releases]
        if missing:
            raise ConfigError(f"model version(s) {missing} are not held; give the bundle directory")
        bundles = {v: self._dirs[v] for v in (version, baseline) if v in self._dirs}
        return controller.start(transport, version, baseline, bundles, rollout_id)

    def observe(self, transport: Transport, status: StatusMessage) -> None:
        """A device's STATUS (the dispatcher forwards each one)."""
        if self.rollout is not None:
            self._ensure_loaded()
            self.rollout.observe(transport, status)

    def tick(self, transport: Transport) -> None:
        """Called on every dispatcher pump: re-announce after a restart, let soak time count."""
        if self.rollout is None:
            return
        self._ensure_loaded()
        if self._republish is not None:
            channel, self._republish = self._republish, None
            self._publish_channel(transport, channel, self._channels[channel], None)
        self.rollout.tick(transport)

    def rollout_status(self) -> dict[str, Any] | None:
        """The rollout for the ops view (:func:`broker_server.rollout_view.rollout_status`), or None."""
        if self.rollout is None:
            return None
        self._ensure_loaded()
        return self.rollout.to_status()

    def _controller(self) -> RolloutController:
        if self.rollout is None:
            raise ConfigError("no rollout settings: give ServerConfig.rollout (a [rollout] table)")
        self._ensure_loaded()
        return self.rollout

    def _completed(self, transport: Transport, version: int) -> None:
        assert self.rollout is not None
        self._publish_channel(transport, self.rollout.channel, version, None)

    def _ensure_loaded(self) -> None:
        """Continue a saved rollout (first use only): hold its bundles again, restore the channel."""
        if self.rollout is None or not self.rollout.load():
            return
        state = self.rollout.state
        assert state is not None
        for version, directory in sorted(self.rollout.bundles.items()):
            if version not in self._releases:
                self.add(version, directory)
        plan = state.plan
        self._channels[self.rollout.channel] = plan.version if state.status == "complete" else plan.baseline_version
        self._republish = self.rollout.channel

    def transfer_of(self, device_id: str) -> str | None:
        """The transfer id of the device's current model download, if any."""
        return self._transfers.get(device_id)

    def handle_fetch(self, fetch: FetchMessage, link: TransferLink, *, claims: ServerClaims | None = None) -> str:
        """Start sending the archive to ``fetch.device_id``; returns the transfer id.

        With ``claims`` (the device takes claim checks) an archive above their threshold goes by
        reference instead: stored once, a CLAIM with a presigned GET URL; returns its claim id.
        Raises :class:`ContractViolation` (after answering the device with an ERROR) for a
        version not held, :class:`ProtocolError` when too many transfers are running.
        """
        release = self._releases.get(fetch.version)
        if release is None:
            self.counters["unknown_version"] += 1
            reason = f"model version {fetch.version} is not available (held: {sorted(self._releases)})"
            self._answer_error(link, fetch, reason)
            raise ContractViolation(reason)
        refusal = self.rollout.fetch_refusal(fetch.device_id, fetch.version) if self.rollout is not None else None
        if refusal is not None:
            self.counters["not_targeted"] += 1
            self._answer_error(link, fetch, refusal)
            raise ContractViolation(refusal)
        if claims is not None and should_claim_check(len(release.archive), claims.config.threshold):
            return self._send_reference(fetch, link, claims, release)
        self._prune_transfers(link)
        previous = self._transfers.pop(fetch.device_id, None)
        if previous is not None:
            link.forget(previous)
            self.counters["replaced"] += 1
        elif len(self._transfers) >= self.max_transfers:
            self.counters["busy"] += 1
            raise ProtocolError(f"{len(self._transfers)} model transfers running; FETCH of v{fetch.version} dropped")
        transfer_id = link.send(
            self.topics.tasks(fetch.device_id),
            release.archive,
            device_id=fetch.device_id,
            round=-1,
            task_id=model_object_id(fetch.version),
            chunk_size=min(fetch.chunk_size, self.max_chunk_bytes),
        )
        self._transfers[fetch.device_id] = transfer_id
        self.counters["served"] += 1
        log.info("sending model v%d to %s (transfer %s)", fetch.version, fetch.device_id, transfer_id)
        return transfer_id

    def _send_reference(self, fetch: FetchMessage, link: TransferLink, claims: ServerClaims, release: Release) -> str:
        try:
            reference = claims.model_reference(fetch.device_id, fetch.version, release.archive)
        except BlobError as exc:  # the device asks again after its timeout
            raise ProtocolError(f"cannot store model v{fetch.version} for a claim check: {exc.reason}") from exc
        link.transport.publish(self.topics.tasks(fetch.device_id), encode_message(reference), qos=1)
        self.counters["served_by_claim"] += 1
        log.info("model v%d to %s by claim check (%d bytes)", fetch.version, fetch.device_id, reference.size)
        return reference.claim_id

    def _prune_transfers(self, link: TransferLink) -> None:
        """Forget finished transfers (done or failed) so the link does not keep them."""
        for device_id, transfer_id in list(self._transfers.items()):
            if transfer_id not in link.transfers():
                del self._transfers[device_id]
                continue
            state = link.state(transfer_id)
            if state != SENDING:
                self.counters["completed" if state == DONE else "failed"] += 1
                link.forget(transfer_id)
                del self._transfers[device_id]

    def _prune(self, also_keep: int | None = None) -> None:
        """Drop the oldest versions beyond ``keep`` that no channel announces."""
        protected = {*self._channels.values(), also_keep, *self._rollout_versions()}
        for version in sorted(self._releases):
            if len(self._releases) <= self.keep:
                return
            if version not in protected:
                del self._releases[version]  # running transfers keep their own reference

    def _rollout_versions(self) -> set[int]:
        state = self.rollout.state if self.rollout is not None else None
        if state is None:
            return set()
        return {state.plan.version, state.plan.baseline_version, *state.plan.pins.values()}

    def _answer_error(self, link: TransferLink, fetch: FetchMessage, reason: str) -> None:
        error = ErrorMessage(
            device_id=fetch.device_id,
            round=-1,
            task_id=model_object_id(fetch.version),
            code=ContractViolation.code,
            reason=reason,
        )
        try:
            link.transport.publish(self.topics.tasks(fetch.device_id), encode_message(error), qos=1)
        except TransportError as exc:  # the device asks again after its timeout
            log.warning("cannot answer %s's FETCH: %s", fetch.device_id, exc.reason)
