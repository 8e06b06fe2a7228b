"""ModelStore: installs, every refusal keeps the current model, rollback, pruning and recovery."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import BundleError, StorageError, TrainingError
from edge_agent.ota.archive import pack_bundle
from edge_agent.ota.store import INSTALL_STEPS, ModelStore
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, evaluate_loss, predict


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def accept(bundle: Bundle) -> None:
    return None


@pytest.fixture
def store(tmp_path: Path, v1: Release) -> ModelStore:
    """A store with v1 installed as version 1."""
    opened = ModelStore(tmp_path / "store", clock=Clock()).open()
    assert opened.install_directory(1, v1.directory, validate=evaluate_loss).ok
    return opened


def version_dirs(store: ModelStore) -> list[str]:
    return sorted(p.name for p in (store.root / "versions").iterdir())


def assert_untouched(store: ModelStore, release: Release) -> None:
    current = store.current()
    assert current is not None and current.digest == release.digest
    assert list((store.root / "staging").iterdir()) == []
    assert Bundle.open(current.path).digest == release.digest


def test_first_install_from_a_directory(tmp_path: Path, v1: Release) -> None:
    store = ModelStore(tmp_path / "store", clock=Clock()).open()
    assert store.current() is None

    report = store.install_directory(1, v1.directory, validate=evaluate_loss)

    assert report.ok and report.stage == "done" and report.previous_version is None
    current = store.current()
    assert current is not None and (current.version, current.digest) == (1, v1.digest)
    assert current.path == tmp_path / "store" / "versions" / f"1-{v1.digest[:12]}"
    pointer = json.loads((tmp_path / "store" / "current.json").read_bytes())
    assert pointer["current"]["digest"] == v1.digest and pointer["previous"] is None


def test_upgrade_switches_models_and_keeps_the_previous(store: ModelStore, v1: Release, v2: Release) -> None:
    before = predict(v1.directory)

    report = store.install(2, v2.archive, expected_digest=v2.digest, validate=evaluate_loss)

    assert report.ok and report.version == 2 and report.previous_version == 1
    assert report.as_dict() == {
        "ok": True,
        "version": 2,
        "stage": "done",
        "reason": "installed",
        "code": None,
        "digest": v2.digest,
        "previous_version": 1,
        "at": report.at,
        "metrics": {"loss": evaluate_loss(Bundle.open(v2.directory))},
        "previous_digest": v1.digest,
        "previous_metrics": {},  # the updater measures those, not the store
    }
    current, previous = store.current(), store.previous()
    assert current is not None and current.version == 2 and previous is not None and previous.version == 1
    after = predict(current.path)
    assert after.shape == before.shape and np.isfinite(after).all() and not np.allclose(after, before)
    reopened = ModelStore(store.root).open().current()
    assert reopened is not None and reopened.digest == v2.digest


def test_install_from_an_archive_file(store: ModelStore, v2: Release, tmp_path: Path) -> None:
    archive = tmp_path / "download.part"
    archive.write_bytes(v2.archive)

    assert store.install(2, archive, expected_digest=v2.digest, validate=accept).ok


def test_steps_reach_the_hook_in_order(store: ModelStore, v2: Release) -> None:
    steps: list[str] = []

    store.install(2, v2.archive, expected_digest=v2.digest, validate=accept, _after_step=steps.append)

    assert tuple(steps) == INSTALL_STEPS


def test_prune_keeps_exactly_current_and_previous(store: ModelStore, v2: Release, v3: Release) -> None:
    store.install(2, v2.archive, expected_digest=v2.digest, validate=accept)
    store.install(3, v3.archive, expected_digest=v3.digest, validate=accept)

    assert version_dirs(store) == sorted([f"2-{v2.digest[:12]}", f"3-{v3.digest[:12]}"])


def _flip_byte_in(archive: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        info = tar.getmember(member)
    data = bytearray(archive)
    data[info.offset_data + info.size // 2] ^= 0xFF
    return bytes(data)


def test_flipped_byte_in_an_onnx_file_is_an_integrity_failure(store: ModelStore, v1: Release, v2: Release) -> None:
    report = store.install(2, _flip_byte_in(v2.archive, "inference.onnx"), expected_digest=v2.digest, validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "verify", "integrity_error")
    assert "inference.onnx" in report.reason
    assert_untouched(store, v1)
    assert version_dirs(store) == [f"1-{v1.digest[:12]}"]


def test_file_not_pinned_by_the_manifest_is_refused(store: ModelStore, v1: Release, v2: Release) -> None:
    members = []
    with tarfile.open(fileobj=io.BytesIO(v2.archive), mode="r:") as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            members.append((member, handle.read()))
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in [*members, (tarfile.TarInfo("payload.so"), b"\x7fELF")]:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    report = store.install(2, rebuilt.getvalue(), expected_digest=v2.digest, validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "verify", "integrity_error")
    assert "payload.so" in report.reason
    assert_untouched(store, v1)


def test_truncated_archive_fails_at_unpack(store: ModelStore, v1: Release, v2: Release) -> None:
    report = store.install(2, v2.archive[: len(v2.archive) // 3], expected_digest=v2.digest, validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "unpack", "bundle_error")
    assert_untouched(store, v1)


def test_wrong_expected_digest_is_refused(store: ModelStore, v1: Release, v2: Release) -> None:
    report = store.install(2, v2.archive, expected_digest=v1.digest, validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "digest", "integrity_error")
    assert_untouched(store, v1)


def test_path_traversal_archive_writes_nothing_outside(store: ModelStore, v1: Release, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("manifest.json", "../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))

    report = store.install(2, buffer.getvalue(), expected_digest=v1.digest, validate=accept)

    assert (report.ok, report.stage) == (False, "unpack") and "unsafe file name" in report.reason
    assert not list(tmp_path.rglob("escaped.txt"))
    assert_untouched(store, v1)


def test_downgrade_is_refused_unless_allowed(store: ModelStore, v1: Release, v2: Release) -> None:
    store.install(5, v2.archive, expected_digest=v2.digest, validate=accept)

    refused = store.install(4, v1.archive, expected_digest=v1.digest, validate=accept)
    allowed = store.install(4, v1.archive, expected_digest=v1.digest, validate=accept, allow_downgrade=True)

    assert (refused.ok, refused.stage, refused.code) == (False, "downgrade", "contract_violation")
    assert allowed.ok and allowed.previous_version == 5
    current = store.current()
    assert current is not None and (current.version, current.digest) == (4, v1.digest)


def test_reinstalling_the_current_version_is_a_no_op(store: ModelStore, v1: Release) -> None:
    report = store.install(1, v1.archive, expected_digest=v1.digest, validate=accept)

    assert report.ok and report.reason == "already installed"
    assert store.previous() is None


@pytest.mark.parametrize("outcome", ["raises", "nan", "inf"])
def test_failed_validation_keeps_the_previous_model(outcome: str, store: ModelStore, v1: Release, v2: Release) -> None:
    def validate(bundle: Bundle) -> float:
        if outcome == "raises":
            raise TrainingError("evaluation batch failed")
        return float(outcome)

    report = store.install(2, v2.archive, expected_digest=v2.digest, validate=validate)

    assert (report.ok, report.stage) == (False, "validate")
    assert_untouched(store, v1)
    assert version_dirs(store) == [f"1-{v1.digest[:12]}"]


def test_signature_hook_sees_the_unpacked_bundle_and_can_refuse(store: ModelStore, v1: Release, v2: Release) -> None:
    seen: list[Path] = []

    def verify(directory: Path) -> None:
        seen.append(directory)
        assert (directory / "manifest.json").is_file()
        raise BundleError("signature does not verify")

    report = store.install(2, v2.archive, expected_digest=v2.digest, validate=accept, verify=verify)

    assert (report.ok, report.stage, report.reason) == (False, "signature", "signature does not verify")
    assert len(seen) == 1 and seen[0].parent == store.root / "staging"
    assert_untouched(store, v1)


def test_rollback_restores_the_previous_model(
    store: ModelStore, v1: Release, v2: Release, caplog: pytest.LogCaptureFixture
) -> None:
    store.install(2, v2.archive, expected_digest=v2.digest, validate=accept)

    with caplog.at_level(logging.WARNING, logger="fedflock.ota"):
        report = store.rollback("non-finite training loss")

    assert report.ok and report.version == 1 and report.previous_version == 2
    assert "rolled back from version 2 to 1: non-finite training loss" in caplog.text
    assert_untouched(store, v1)
    assert store.previous() is None and version_dirs(store) == [f"1-{v1.digest[:12]}"]
    again = store.rollback("still bad")
    assert (again.ok, again.stage, again.reason) == (False, "rollback", "no previous version to roll back to")
    assert_untouched(store, v1)


def test_rollback_without_any_model(tmp_path: Path) -> None:
    report = ModelStore(tmp_path).open().rollback("why not")

    assert (report.ok, report.version, report.stage) == (False, None, "rollback")


def test_pointer_write_failure_keeps_the_current_model(
    store: ModelStore, v1: Release, v2: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(target).name == "current.json":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    report = store.install(2, v2.archive, expected_digest=v2.digest, validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "activate", "storage_error")
    assert_untouched(store, v1)
    assert version_dirs(store) == [f"1-{v1.digest[:12]}"]
    assert sorted(p.name for p in store.root.iterdir()) == ["current.json", "staging", "versions"]


def test_store_must_be_opened_first(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="open"):
        ModelStore(tmp_path).current()
    assert list(tmp_path.iterdir()) == []


def test_recover_falls_back_to_previous_when_current_is_damaged(
    store: ModelStore, v1: Release, v2: Release, caplog: pytest.LogCaptureFixture
) -> None:
    store.install(2, v2.archive, expected_digest=v2.digest, validate=accept)
    current = store.current()
    assert current is not None
    with open(current.path / "train_step.onnx", "r+b") as handle:  # bit rot
        handle.write(b"\0\0\0\0")

    with caplog.at_level(logging.WARNING, logger="fedflock.ota"):
        recovered = ModelStore(store.root).open()

    assert_untouched(recovered, v1)
    assert recovered.previous() is None
    assert version_dirs(recovered) == [f"1-{v1.digest[:12]}"]
    assert "model pointer repaired" in caplog.text and "train_step.onnx" in caplog.text


@pytest.mark.parametrize("pointer", [None, b"{garbage", b'{"format": 1, "current": {"version": "x"}}'])
def test_recover_without_a_usable_pointer_uses_the_newest_intact_version(
    pointer: bytes | None, store: ModelStore, v2: Release, v3: Release
) -> None:
    store.install(2, v2.archive, expected_digest=v2.digest, validate=accept)
    store.install(3, v3.archive, expected_digest=v3.digest, validate=accept)
    if pointer is None:
        (store.root / "current.json").unlink()
    else:
        (store.root / "current.json").write_bytes(pointer)

    recovered = ModelStore(store.root).open()

    current, previous = recovered.current(), recovered.previous()
    assert current is not None and (current.version, current.digest) == (3, v3.digest)
    assert previous is not None and previous.version == 2
    assert json.loads((store.root / "current.json").read_bytes())["current"]["version"] == 3


def test_recover_removes_staging_leftovers(store: ModelStore, v1: Release) -> None:
    (store.root / "staging" / "7-deadbeef").mkdir()
    (store.root / "staging" / "7-deadbeef" / "manifest.json").write_text("{}")
    (store.root / ".current.json.tmp-123").write_text("{}")

    recovered = ModelStore(store.root).open()

    assert_untouched(recovered, v1)
    assert sorted(p.name for p in store.root.iterdir()) == ["current.json", "staging", "versions"]


def test_install_directory_with_an_unreadable_bundle_reports_unpack(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store").open()

    report = store.install_directory(1, tmp_path / "missing", validate=accept)

    assert (report.ok, report.stage, report.code) == (False, "unpack", "bundle_error")
    assert store.current() is None


def test_packing_the_installed_model_reproduces_the_release(store: ModelStore, v1: Release) -> None:
    current = store.current()
    assert current is not None

    assert pack_bundle(current.path) == v1.archive
