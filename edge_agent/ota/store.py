"""Versioned model store on the device: install over the air, switch atomically, roll back.

Layout under ``root``::

    current.json                    {"format": 1, "current": record | null, "previous": record | null}
                                    record: {"version", "digest", "installed_at"[, "issued_at"]}
    versions/<version>-<digest12>/  an unpacked, verified bundle (current and previous only)
    staging/                        installs in progress and directories being deleted

:meth:`ModelStore.install` runs these stages; a failure reports the stage's name:

========== ===================================================================================
downgrade  ``version <= current`` is refused unless ``allow_downgrade`` (checked first: free)
unpack     :func:`~edge_agent.ota.archive.unpack_bundle` into ``staging/``
verify     :meth:`Bundle.open` checks every file's sha256; files the manifest does not list fail
digest     the manifest's sha256 must equal ``expected_digest`` (what the server announced)
signature  the ``verify`` hook (the agent's: ``manifest.sig`` by a trusted key, edge_agent.crypto.trust);
           ``None`` (no trusted keys configured) skips it: integrity, not authenticity
validate   ``validate(bundle)`` (the agent runs one evaluation batch): a :class:`FedflockError`
           or a non-finite loss fails; its metrics go into the report (:mod:`.validation`)
activate   rename into ``versions/``, replace ``current.json`` (previous := old current), prune
========== ===================================================================================

Crash safety: until the pointer is replaced (tmp + fsync + ``os.replace`` + fsync of the
directory) an install only adds files :meth:`ModelStore.recover` removes, and directories are
deleted by renaming them into ``staging/`` first, so a crash at any point leaves the old model
or the new one. One process per root; not thread-safe.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import BundleError, ContractViolation, FedflockError, IntegrityError, StorageError
from edge_agent.ota import staging as disk
from edge_agent.ota.archive import check_only_bundle_files, pack_bundle, unpack_bundle
from edge_agent.ota.reports import InstalledModel, InstallReport
from edge_agent.ota.validation import Validate, validation_metrics
from edge_agent.protocol.manifest import load_manifest
from edge_agent.runtime.bundle import Bundle

__all__ = ["INSTALL_STEPS", "STAGES", "InstallReport", "InstalledModel", "ModelStore"]

_log = logging.getLogger("fedflock.ota")

POINTER_FORMAT = 1
#: Durable points of an install, in order, as passed to the test-only ``_after_step`` hook.
INSTALL_STEPS = ("unpacked", "validated", "renamed", "pointer_tmp", "pointer", "pruned")
STAGES = ("downgrade", "unpack", "verify", "digest", "signature", "validate", "activate", "rollback", "done")
_VERSION_DIR = re.compile(r"^(\d+)-([0-9a-f]{12})$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

Verify = Callable[[Path], None]


@dataclass(frozen=True)
class _Request:
    version: int
    expected_digest: str
    validate: Validate
    verify: Verify | None
    allow_downgrade: bool
    after: Callable[[str], None]
    issued_at: int = 0


class _InstallFailed(Exception):
    def __init__(self, stage: str, error: FedflockError) -> None:
        super().__init__(error.reason)
        self.stage, self.error = stage, error


@contextmanager
def _stage(name: str) -> Iterator[None]:
    try:
        yield
    except FedflockError as exc:
        raise _InstallFailed(name, exc) from exc


class ModelStore:
    """The device's installed models; call :meth:`open` before anything else."""

    def __init__(
        self, root: str | os.PathLike[str], *, clock: Callable[[], float] = time.time, max_bundle_bytes: int = 2**29
    ) -> None:
        self.root = Path(root)
        self.clock = clock
        self.max_bundle_bytes = max_bundle_bytes
        self._versions, self._staging = self.root / "versions", self.root / "staging"
        self._pointer = self.root / "current.json"
        self._current: InstalledModel | None = None
        self._previous: InstalledModel | None = None
        self._opened = False

    def open(self) -> ModelStore:
        """:meth:`recover` (creating the layout if needed); returns ``self``."""
        self.recover()
        return self

    def recover(self) -> InstalledModel | None:
        """Repair the store after a crash; returns the current model (None: nothing usable).

        Current: the recorded current if it opens with its digest, else the recorded previous,
        else the newest version that opens. Previous: the recorded previous or an older version
        that opens (never an orphan newer than current). Staging and other versions are removed.
        """
        for path in (self._versions, self._staging):
            disk.make_directory(path)
        self._opened = True
        for leftover in [*disk.list_directory(self._staging), *self.root.glob(".current.json.tmp-*")]:
            _log.info("removing leftover %s", leftover)
            disk.remove_tree(leftover)
        recorded = self._read_pointer()
        scanned = self._scan_versions()
        checked: dict[Path, bool] = {}
        current = _first_intact([*recorded, *scanned], checked)
        older = [m for m in scanned if current is not None and m.version < current.version]
        previous = _first_intact([recorded[1], *older], checked, exclude=current) if current else None
        if recorded != (current, previous):
            labels = [f"{m.version}-{m.digest[:12]}" if m else "none" for m in (*recorded, current, previous)]
            _log.warning("model pointer repaired: (current, previous) (%s, %s) -> (%s, %s)", *labels)
            self._write_pointer(current, previous)
        self._current, self._previous = current, previous
        self._prune()
        return current

    def current(self) -> InstalledModel | None:
        self._check_open()
        return self._current

    def previous(self) -> InstalledModel | None:
        self._check_open()
        return self._previous

    def install(
        self,
        version: int,
        archive: bytes | Path,
        *,
        expected_digest: str,
        validate: Validate,
        verify: Verify | None = None,
        allow_downgrade: bool = False,
        issued_at: int = 0,
        _after_step: Callable[[str], None] | None = None,
    ) -> InstallReport:
        """Install ``archive`` (tar bytes, or a file holding them) as ``version``.

        ``issued_at`` (the signed release statement's, 0: none) is recorded with the model.

        A bad archive or model never raises: the report says ``ok=False`` and the stage, and
        the current model is untouched. Reinstalling the current version and digest is a no-op
        success. Other exceptions from the hooks (bugs) propagate once staging is cleaned up.
        ``_after_step`` is for tests only (crash injection): it is called with each name in
        :data:`INSTALL_STEPS` once that step is durable.
        """
        self._check_open()
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ContractViolation(f"model version must be a non-negative integer, got {version!r}")
        if self._current is not None and (self._current.version, self._current.digest) == (version, expected_digest):
            return self._report(True, version, "done", "already installed", digest=expected_digest)
        after = _after_step or (lambda _step: None)
        request = _Request(version, expected_digest, validate, verify, allow_downgrade, after, issued_at)
        staging = self._staging / f"{version}-{uuid.uuid4().hex[:12]}"
        try:
            return self._install(request, archive, staging)
        except _InstallFailed as failure:
            _log.warning("install of version %d failed at %s: %s", version, failure.stage, failure.error.reason)
            self._prune()  # an activation that failed after the rename leaves an orphan
            return self._report(False, version, failure.stage, failure.error.reason, code=failure.error.code)
        finally:
            self._discard_logged(staging)

    def install_directory(
        self,
        version: int,
        bundle_dir: str | Path,
        *,
        validate: Validate,
        expected_digest: str | None = None,
        verify: Verify | None = None,
        allow_downgrade: bool = False,
    ) -> InstallReport:
        """Install a bundle directory (e.g. the first model, from the agent's config).

        ``expected_digest`` defaults to the directory's own manifest digest (a local source is
        trusted to name itself; its files are still checked against the manifest).
        """
        try:
            archive = pack_bundle(bundle_dir)
            digest = expected_digest or load_manifest(bundle_dir, verify=False)[1]
        except BundleError as exc:
            return self._report(False, version, "unpack", exc.reason, code=exc.code)
        return self.install(
            version, archive, expected_digest=digest, validate=validate, verify=verify, allow_downgrade=allow_downgrade
        )

    def rollback(self, reason: str) -> InstallReport:
        """Make the previous model current again (e.g. the new one trains to a non-finite loss).

        The rolled-back version is deleted. Without a usable previous model nothing changes
        and the report (``ok=False``, stage ``"rollback"``) says why.
        """
        self._check_open()
        bad, target = self._current, self._previous
        if bad is None or target is None:
            _log.error("rollback requested (%s) but there is no previous version", reason)
            return self._report(False, bad.version if bad else None, "rollback", "no previous version to roll back to")
        try:
            Bundle.open(target.path)
            self._write_pointer(target, None)
        except (BundleError, StorageError) as exc:
            _log.error("rollback to version %d impossible: %s", target.version, exc.reason)
            return self._report(False, target.version, "rollback", exc.reason, code=exc.code)
        self._current, self._previous = target, None
        _log.warning("rolled back from version %d to %d: %s", bad.version, target.version, reason)
        self._prune()
        return self._report(
            True,
            target.version,
            "done",
            reason,
            digest=target.digest,
            previous_version=bad.version,
            previous_digest=bad.digest,
        )

    def _install(self, request: _Request, archive: bytes | Path, staging: Path) -> InstallReport:
        version, current = request.version, self._current
        with _stage("downgrade"):
            if current is not None and version <= current.version and not request.allow_downgrade:
                raise ContractViolation(f"version {version} is not newer than the installed version {current.version}")
        with _stage("unpack"):
            unpack_bundle(archive, staging, max_bytes=self.max_bundle_bytes)
            disk.fsync_directory(self._staging)
        request.after("unpacked")
        bundle, metrics = self._check_bundle(request, staging)
        request.after("validated")
        path = self._versions / f"{version}-{bundle.digest[:12]}"
        model = InstalledModel(
            version=version, digest=bundle.digest, path=path, installed_at=self.clock(), issued_at=request.issued_at
        )
        with _stage("activate"):
            self._activate(staging, model, request.after)
        self._prune()
        request.after("pruned")
        _log.info("installed model version %d (%s)", version, model.digest[:12])
        previous = self._previous
        return self._report(
            True,
            version,
            "done",
            "installed",
            digest=model.digest,
            metrics=metrics,
            previous_version=previous.version if previous else None,
            previous_digest=previous.digest if previous else None,
        )

    def _check_bundle(self, request: _Request, staging: Path) -> tuple[Bundle, dict[str, float]]:
        with _stage("verify"):
            bundle = Bundle.open(staging)
            check_only_bundle_files(staging, bundle.manifest)
        with _stage("digest"):
            if bundle.digest != request.expected_digest:
                raise IntegrityError(f"bundle digest {bundle.digest[:16]}… != expected {request.expected_digest[:16]}…")
        if request.verify is not None:
            with _stage("signature"):
                request.verify(staging)
        with _stage("validate"):
            metrics = validation_metrics(request.validate(bundle))
        return bundle, metrics

    def _activate(self, staging: Path, model: InstalledModel, after: Callable[[str], None]) -> None:
        # Only an orphan or the previous model (a downgrade to it: same files) can be in the way.
        self._discard(model.path)
        disk.rename_path(staging, model.path)
        disk.fsync_directory(self._versions)
        disk.fsync_directory(self._staging)
        after("renamed")
        self._write_pointer(model, self._current, before_replace=lambda: after("pointer_tmp"))
        after("pointer")
        self._current, self._previous = model, self._current

    def _check_open(self) -> None:
        if not self._opened:
            raise StorageError("ModelStore.open() has not been called")

    def _read_pointer(self) -> tuple[InstalledModel | None, InstalledModel | None]:
        try:
            raw = disk.read_json(self._pointer)
        except StorageError as exc:
            _log.warning("model pointer unreadable: %s", exc.reason)
            return None, None
        if raw is not None and (not isinstance(raw, dict) or raw.get("format") != POINTER_FORMAT):
            _log.warning("model pointer %s has an unknown format", self._pointer)
            raw = None
        return (None, None) if raw is None else (self._record(raw.get("current")), self._record(raw.get("previous")))

    def _record(self, raw: Any) -> InstalledModel | None:
        try:
            version, digest, stamp = raw["version"], str(raw["digest"]), float(raw.get("installed_at", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not isinstance(version, int) or isinstance(version, bool) or not _DIGEST.match(digest):
            return None
        path = self._versions / f"{version}-{digest[:12]}"
        issued = raw.get("issued_at", 0)
        issued = issued if isinstance(issued, int) and not isinstance(issued, bool) and issued > 0 else 0
        return InstalledModel(version=version, digest=digest, path=path, installed_at=stamp, issued_at=issued)

    def _write_pointer(self, current: InstalledModel | None, previous: InstalledModel | None, **options: Any) -> None:
        def record(m: InstalledModel | None) -> dict[str, Any] | None:
            if m is None:
                return None
            fields = {"version": m.version, "digest": m.digest, "installed_at": m.installed_at}
            return fields | ({"issued_at": m.issued_at} if m.issued_at else {})

        value = {"format": POINTER_FORMAT, "current": record(current), "previous": record(previous)}
        disk.write_json_atomic(self._pointer, value, **options)

    def _scan_versions(self) -> list[InstalledModel]:
        """Version directories, newest first, named by their manifest digest (files checked later)."""
        found: list[InstalledModel] = []
        for path in disk.list_directory(self._versions):
            match = _VERSION_DIR.match(path.name)
            try:
                digest = load_manifest(path, verify=False)[1] if match else ""
            except BundleError:
                continue
            if match and digest.startswith(match.group(2)):
                found.append(InstalledModel(version=int(match.group(1)), digest=digest, path=path, installed_at=0.0))
        return sorted(found, key=lambda m: m.version, reverse=True)

    def _prune(self) -> None:
        """Remove every version but current and previous (failures are logged; recover retries)."""
        keep = {m.path for m in (self._current, self._previous) if m is not None}
        try:
            for path in disk.list_directory(self._versions):
                if path not in keep:
                    _log.info("pruning %s", path.name)
                    self._discard(path)
        except StorageError as exc:
            _log.warning("pruning stopped: %s", exc.reason)

    def _discard(self, path: Path) -> None:
        """Delete a directory without ever leaving it half-deleted under ``versions/``."""
        if path.exists():
            trash = self._staging / f"trash-{uuid.uuid4().hex[:12]}"
            disk.rename_path(path, trash)
            disk.remove_tree(trash)

    def _discard_logged(self, path: Path) -> None:
        """Housekeeping once the outcome is decided: a failure is logged (recover retries)."""
        try:
            self._discard(path)
        except StorageError as exc:
            _log.warning("cannot remove %s: %s", path, exc.reason)

    def _report(self, ok: bool, version: int | None, stage: str, reason: str, **fields: Any) -> InstallReport:
        return InstallReport(ok=ok, version=version, stage=stage, reason=reason, at=self.clock(), **fields)


def _first_intact(
    candidates: list[InstalledModel | None], checked: dict[Path, bool], *, exclude: InstalledModel | None = None
) -> InstalledModel | None:
    """The first candidate whose directory opens as a bundle with the recorded digest."""
    for model in candidates:
        if model is None or (exclude is not None and model.path == exclude.path):
            continue
        if model.path not in checked:
            checked[model.path] = _opens(model)
        if checked[model.path]:
            return model
    return None


def _opens(model: InstalledModel) -> bool:
    try:
        digest = Bundle.open(model.path).digest
        if digest != model.digest:
            raise IntegrityError(f"its manifest digest is {digest[:12]}…, not {model.digest[:12]}…")
    except BundleError as exc:
        _log.warning("version %d (%s) does not open: %s", model.version, model.path.name, exc.reason)
        return False
    return True
