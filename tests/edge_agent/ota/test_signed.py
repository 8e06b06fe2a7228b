"""Signed artifacts on the device (issue #7): with trusted keys, unsigned, tampered, untrusted-key,
downgraded and replayed MODELs and bundles are refused before anything is activated — the running
model is unchanged and nothing is left in staging — while correctly signed releases install.

Real model store, staging and updater; the server end is the in-process chunk sender of
test_updater.py. Signatures are made with ``cryptography`` (edge_agent.crypto.signing) and
verified by the pure-Python verifier, as on a device.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from edge_agent.crypto.signing import SigningKey, sign_bundle, sign_release
from edge_agent.crypto.trust import SIGNATURE_FILE, TrustedKeys
from edge_agent.ota.archive import pack_bundle
from edge_agent.ota.authority import AUTHORITY_FILE
from edge_agent.ota.reports import InstallReport
from edge_agent.protocol.manifest import load_manifest, sha256_file, write_manifest
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, derive_bundle, release
from tests.edge_agent.ota.test_updater import DEVICE, Device, Sender, announcement, staged_files

KEY = SigningKey.generate()
ROTATED = SigningKey.generate()
ROGUE = SigningKey.generate()
TRUSTED = TrustedKeys((KEY.public_key, ROTATED.public_key))


def signed_copy(source: Path, dest: Path, key: SigningKey | None = KEY) -> Release:
    shutil.copytree(source, dest)
    if key is not None:
        sign_bundle(dest, key)
    return release(dest)


@pytest.fixture(scope="module")
def bundles(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    root = tmp_path_factory.mktemp("signed")
    v2 = derive_bundle(digits_bundle.directory, root / "v2-src", scale=0.5)
    v3 = derive_bundle(digits_bundle.directory, root / "v3-src", scale=2.0)
    return {
        "v1": signed_copy(digits_bundle.directory, root / "v1"),
        "v2": signed_copy(v2, root / "v2"),
        "v3": signed_copy(v3, root / "v3"),
        "v3-rotated": signed_copy(v3, root / "v3-rotated", ROTATED),
        "v3-unsigned": signed_copy(v3, root / "v3-unsigned", None),
        "v3-rogue": signed_copy(v3, root / "v3-rogue", ROGUE),
    }


def signed(rel: Release, version: int, issued_at: int, *, key: SigningKey = KEY, **changes) -> ModelMessage:
    return sign_release(announcement(rel, version, **changes), key, issued_at=issued_at)


def device(tmp_path: Path, bundles: dict[str, Release]) -> Device:
    return Device(tmp_path, bundles["v1"], trusted_keys=TRUSTED)


def refused(dev: Device, model: ModelMessage) -> InstallReport:
    """``model`` is refused when it arrives: reported, nothing pending, nothing staged."""
    before = dev.version()
    _, report = dev.updater.handle(model)
    assert report is not None and not report.ok and report.version is None, report
    assert report.digest == model.bundle_digest
    assert dev.updater.pending is None and dev.updater.due_fetch(True) is None
    assert dev.version() == before and [p.name for p in staged_files(dev) if p != AUTHORITY_FILE] == []
    return report


def install(dev: Device, model: ModelMessage, rel: Release) -> InstallReport:
    assert dev.updater.announced(model), model
    report = Sender(rel.archive, version=model.version).run(dev.updater)
    assert report is not None
    return report


def assert_untouched(dev: Device, rel: Release, report: InstallReport, stage: str, words: str) -> None:
    assert not report.ok and report.stage == stage and words in report.reason, report
    assert dev.version() == (1, rel.digest)
    assert list((dev.store.root / "staging").iterdir()) == []  # nothing half-installed
    assert [p.name for p in (dev.store.root / "versions").iterdir()] == [f"1-{rel.digest[:12]}"]
    assert [n for n in staged_files(dev) if n.startswith("model-")] == []


def test_a_signed_release_installs_and_records_when_it_was_issued(tmp_path: Path, bundles) -> None:
    dev = device(tmp_path, bundles)
    report = install(dev, signed(bundles["v2"], 2, 1_000), bundles["v2"])
    assert report.ok and dev.version() == (2, bundles["v2"].digest)
    current = dev.store.current()
    assert current is not None and current.issued_at == 1_000
    pointer = json.loads((dev.store.root / "current.json").read_text())
    assert pointer["current"]["issued_at"] == 1_000
    # key rotation: a bundle and a statement by the second trusted key install too
    assert install(dev, signed(bundles["v3-rotated"], 3, 2_000, key=ROTATED), bundles["v3-rotated"]).ok


def test_unsigned_untrusted_and_tampered_models_are_refused_on_arrival(tmp_path: Path, bundles) -> None:
    dev = device(tmp_path, bundles)
    v3 = bundles["v3"]
    unsigned = refused(dev, announcement(v3, 3))
    assert unsigned.stage == "signature" and unsigned.code == "signature_error" and "unsigned" in unsigned.reason
    rogue = refused(dev, signed(v3, 3, 1_000, key=ROGUE))
    assert "not trusted" in rogue.reason
    good = signed(v3, 3, 1_000)
    for field, value in [
        ("version", 4),
        ("bundle_digest", bundles["v2"].digest),
        ("archive_sha256", "0" * 64),
        ("archive_size", 10),
        ("issued_at", 2_000),
        ("channel", "canary"),  # another channel's statement (the device follows "current")
    ]:
        model = dataclasses.replace(good, **{field: value})
        if field == "channel":
            assert not dev.updater.announced(model)  # not ours: ignored before any check
            continue
        assert "does not match (tampered)" in refused(dev, model).reason, field
    forged = dataclasses.replace(good, signature=good.signature[:-2] + ("00" if good.signature[-2:] != "00" else "01"))
    assert "tampered" in refused(dev, forged).reason
    assert refused(dev, dataclasses.replace(good, signing_key=ROGUE.public_key.hex())).stage == "signature"
    # the same refused MODEL delivered again (retained) is not reported twice
    assert dev.updater.handle(announcement(v3, 3)) == (None, None)
    # a refused directed MODEL does not take the device off its channel
    assert refused(dev, announcement(v3, 3, channel=DEVICE)).stage == "signature"
    assert install(dev, good, v3).ok


@pytest.mark.parametrize(
    ("name", "stage", "words"),
    [
        ("unsigned", "signature", "unsigned"),
        ("rogue-key", "signature", "not trusted"),
        ("manifest", "signature", "does not match (tampered)"),
        ("graph-and-manifest", "signature", "does not match (tampered)"),
        ("graph", "verify", "sha256"),
        ("signature-file", "signature", "does not match (tampered)"),
        ("signature-garbage", "signature", "manifest.sig"),
    ],
)
def test_tampered_bundles_are_refused_before_validation_or_activation(tmp_path, bundles, name, stage, words) -> None:
    directory = tmp_path / "bundle"
    shutil.copytree(bundles["v3"].directory, directory)
    manifest, _ = load_manifest(directory, verify=False)
    graph = next(f for f in manifest.files if f.endswith(".onnx"))
    if name == "unsigned":
        (directory / SIGNATURE_FILE).unlink()
    elif name == "rogue-key":
        sign_bundle(directory, ROGUE)
    elif name == "manifest":
        write_manifest(directory, dataclasses.replace(manifest, name="tampered"))
    elif name in ("graph", "graph-and-manifest"):
        with open(directory / graph, "ab") as handle:
            handle.write(b"\x00")
        if name == "graph-and-manifest":
            files = {**manifest.files, graph: sha256_file(directory / graph)}
            write_manifest(directory, dataclasses.replace(manifest, files=files))
    elif name == "signature-file":
        line = (directory / SIGNATURE_FILE).read_text()
        (directory / SIGNATURE_FILE).write_text(line[:-3] + ("0" if line[-3] != "0" else "1") + line[-2:])
    else:
        (directory / SIGNATURE_FILE).write_bytes(b"not a signature\n")
    tampered = Release(directory, load_manifest(directory, verify=False)[1], pack_bundle(directory))
    validated: list[str] = []
    dev = Device(tmp_path / "dev", bundles["v1"], trusted_keys=TRUSTED, validate=lambda b: validated.append("ran"))
    report = install(dev, signed(tampered, 3, 1_000), tampered)
    assert_untouched(dev, bundles["v1"], report, stage, words)
    assert validated == []  # the untrusted model never ran
    if stage == "signature":  # given up until restart (it may come back re-signed), not refused for good
        assert not dev.updater.announced(signed(tampered, 3, 1_001))
        assert Device(tmp_path / "dev", bundles["v1"], trusted_keys=TRUSTED).updater.announced(signed(tampered, 3, 2))


def test_downgrades_need_a_later_directed_statement(tmp_path: Path, bundles) -> None:
    dev = device(tmp_path, bundles)
    v1, v2, v3 = bundles["v1"], bundles["v2"], bundles["v3"]
    assert install(dev, signed(v3, 3, 3_000), v3).ok
    # a channel statement never downgrades (ignored, not fetched)
    assert dev.updater.handle(signed(v2, 2, 9_000)) == (None, None) and dev.updater.pending is None
    # a directed statement issued before v3's is an old order: refused
    old = refused(dev, signed(v1, 1, 2_000, channel=DEVICE))
    assert old.stage == "downgrade" and old.code == "contract_violation" and "not newer" in old.reason
    # the server's rollback order, issued after v3's statement: installed
    report = install(dev, signed(v1, 1, 4_000, channel=DEVICE, rollout_id="r-1"), v1)
    assert report.ok and dev.version() == (1, v1.digest)


def test_a_replayed_directed_statement_is_refused_also_after_a_restart(tmp_path: Path, bundles) -> None:
    dev = device(tmp_path, bundles)
    v1, v2, v3 = bundles["v1"], bundles["v2"], bundles["v3"]
    canary = signed(v2, 2, 1_000, channel=DEVICE, rollout_id="r-1")
    assert install(dev, canary, v2).ok
    rollback = signed(v1, 1, 2_000, channel=DEVICE, rollout_id="r-1")
    assert install(dev, rollback, v1).ok
    # replaying the canary order (an upgrade, validly signed) would undo the server's rollback
    replay = refused(dev, canary)
    assert replay.stage == "downgrade" and "replayed" in replay.reason
    # the same directed MODEL again (a retained re-delivery) is fine: nothing to do
    assert dev.updater.handle(rollback) == (None, None)
    # a channel announcement issued before the directed order is overridden by it (logged, not reported)
    assert dev.updater.handle(signed(v3, 3, 1_500)) == (None, None) and dev.updater.pending is None
    restarted = Device(tmp_path, v1, trusted_keys=TRUSTED)
    assert restarted.updater.handle(canary)[1] is not None and restarted.updater.pending is None
    # a later order installs
    assert install(restarted, signed(v3, 3, 3_000, channel=DEVICE, rollout_id="r-2"), v3).ok


def test_without_trusted_keys_unsigned_models_install_as_before(tmp_path: Path, bundles) -> None:
    dev = Device(tmp_path, bundles["v1"])
    assert install(dev, announcement(bundles["v3-unsigned"], 3), bundles["v3-unsigned"]).ok
