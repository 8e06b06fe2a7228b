"""Expiring release statements on the device (issue #7): expired, not-yet-valid, skew tolerance,
tampered expiry, require_expiry, downgrades still refused, and a re-signed statement that does
not disturb the download it started.

Real model store (its wall clock injected: the gate checks statements against it), staging and
updater; statements signed by the server's :class:`ReleaseSigner` on a fake wall clock; the
server end of a download is test_updater's in-process chunk sender.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from broker_server.pki.release_signer import ReleaseSigner
from edge_agent.crypto.freshness import FreshnessPolicy
from edge_agent.crypto.signing import SigningKey, sign_bundle
from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import ConfigError
from edge_agent.ota.ota_config import parse_ota_table
from edge_agent.ota.reports import InstallReport
from edge_agent.ota.staging import DownloadStaging
from edge_agent.ota.store import ModelStore
from edge_agent.ota.updater import ModelUpdater, UpdaterConfig
from edge_agent.protocol.model_messages import ModelMessage
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, derive_bundle, release
from tests.edge_agent.ota.test_updater import CHUNK, DEVICE, TIMEOUT, Clock, Sender, accept, announcement

KEY = SigningKey.generate()
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, wall seconds
HOUR = 3600.0


class WallClock:
    def __init__(self, seconds: float) -> None:
        self.now = seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def signed_releases(digits_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    """v1 (as exported), v2 and v3 (scaled weights), each with a ``manifest.sig`` by KEY."""
    root = tmp_path_factory.mktemp("expiry")
    sources = {
        "v1": digits_bundle.directory,
        "v2": derive_bundle(digits_bundle.directory, root / "v2-src", scale=0.5),
        "v3": derive_bundle(digits_bundle.directory, root / "v3-src", scale=2.0),
    }
    releases = {}
    for name, source in sources.items():
        shutil.copytree(source, root / name)
        sign_bundle(root / name, KEY)
        releases[name] = release(root / name)
    return releases


class Rig:
    """One device (store on the wall clock ``wall``) and the server's signer on the same time line."""

    def __init__(self, root: Path, v1: Release, *, policy: FreshnessPolicy | None = None, lifetime: float = HOUR):
        self.wall, self.mono = WallClock(T0), Clock()
        self.store = ModelStore(root / "store", clock=self.wall).open()
        if self.store.current() is None:
            assert self.store.install_directory(1, v1.directory, validate=accept).ok
        trusted = TrustedKeys((KEY.public_key,), freshness=policy or FreshnessPolicy())
        config = UpdaterConfig(chunk_size=CHUNK, fetch_timeout_s=TIMEOUT, trusted_keys=trusted)
        staging = DownloadStaging(root / "downloads")
        self.updater = ModelUpdater(DEVICE, Topics(), self.store, staging, accept, config=config, clock=self.mono)
        self.signer = ReleaseSigner(KEY, clock=self.wall, lifetime_s=lifetime)

    def statement(self, rel: Release, version: int, **changes: object) -> ModelMessage:
        return self.signer.sign(announcement(rel, version, **changes))

    def version(self) -> int:
        current = self.store.current()
        assert current is not None
        return current.version

    def refused(self, model: ModelMessage, code: str) -> InstallReport:
        """``model`` is refused on arrival: reported with ``code``, nothing pending or fetched."""
        before = self.version()
        _, report = self.updater.handle(model)
        assert report is not None and not report.ok and report.version is None, report
        assert report.code == code, report
        assert self.updater.pending is None and self.updater.due_fetch(True) is None
        assert self.version() == before
        return report

    def install(self, model: ModelMessage, rel: Release) -> InstallReport:
        assert self.updater.announced(model), model
        report = Sender(rel.archive, version=model.version).run(self.updater)
        assert report is not None
        return report


def test_an_expired_statement_is_refused_and_reported(tmp_path: Path, signed_releases) -> None:
    rig = Rig(tmp_path, signed_releases["v1"])
    channel = rig.statement(signed_releases["v2"], 2)
    directed = rig.statement(signed_releases["v2"], 2, channel=DEVICE, rollout_id="r-1")
    rig.wall.now += 2 * HOUR  # an hour past expiry: replayed, or retained while the server was away
    report = rig.refused(channel, "statement_expired")
    assert report.stage == "signature" and "expired at 2026-01-01T01:00:00Z" in report.reason
    assert rig.refused(directed, "statement_expired").digest == signed_releases["v2"].digest
    # the very same statements, re-signed by the server with a later expiry, are acted on
    assert rig.install(rig.signer.resign(directed), signed_releases["v2"]).ok and rig.version() == 2


def test_a_statement_from_the_future_says_the_device_clock_is_behind(tmp_path: Path, signed_releases) -> None:
    rig = Rig(tmp_path, signed_releases["v1"])
    model = rig.statement(signed_releases["v2"], 2)
    rig.wall.now -= 10 * 60  # the device clock is ten minutes behind the server's
    report = rig.refused(model, "statement_not_yet_valid")
    assert "device clock is behind" in report.reason and report.stage == "signature"
    rig.wall.now += 6 * 60  # four minutes behind: within the 5 minutes tolerated
    assert rig.updater.announced(model) and rig.updater.pending == model


@pytest.mark.parametrize(("skew_s", "late_s", "accepted"), [(300, 240, True), (300, 360, False), (60, 90, False)])
def test_the_clock_skew_tolerance(tmp_path: Path, signed_releases, skew_s: float, late_s: float, accepted) -> None:
    rig = Rig(tmp_path, signed_releases["v1"], policy=FreshnessPolicy(max_clock_skew_s=skew_s))
    model = rig.statement(signed_releases["v2"], 2)
    rig.wall.now += HOUR + late_s  # ``late_s`` past expiry by the device clock
    if accepted:
        assert rig.updater.announced(model) and rig.updater.pending == model
    else:
        rig.refused(model, "statement_expired")


def test_a_tampered_expiry_breaks_the_signature(tmp_path: Path, signed_releases) -> None:
    rig = Rig(tmp_path, signed_releases["v1"])
    model = rig.statement(signed_releases["v2"], 2)
    rig.wall.now += 2 * HOUR
    for tampered in (
        dataclasses.replace(model, expires_at=model.expires_at + 24_000 * 3600),
        dataclasses.replace(model, expires_at=0),
    ):
        report = rig.refused(tampered, "signature_error")
        assert "does not match (tampered)" in report.reason


def test_statements_without_expiry_are_refused_only_when_required(tmp_path: Path, signed_releases) -> None:
    v2 = signed_releases["v2"]
    old_server = ReleaseSigner(KEY, clock=WallClock(T0 - 400 * 86400))  # v1 statements, a year old
    legacy = old_server.sign(announcement(v2, 2))
    assert legacy.expires_at == 0
    assert Rig(tmp_path / "default", signed_releases["v1"]).updater.announced(legacy)
    strict = Rig(tmp_path / "strict", signed_releases["v1"], policy=FreshnessPolicy(require_expiry=True))
    report = strict.refused(legacy, "statement_without_expiry")
    assert "require_expiry" in report.reason
    assert strict.install(strict.statement(v2, 2), v2).ok


def test_downgrades_are_still_refused_with_fresh_statements(tmp_path: Path, signed_releases) -> None:
    v1, v3 = signed_releases["v1"], signed_releases["v3"]
    rig = Rig(tmp_path, v1, lifetime=24 * HOUR)
    baseline_order = rig.statement(v1, 1, channel=DEVICE, rollout_id="r-1")  # issued first
    rig.wall.now += 60
    assert rig.install(rig.statement(v3, 3, channel=DEVICE, rollout_id="r-1"), v3).ok
    # the old order naming the baseline, re-signed with a fresh expiry, is still the old order
    rig.wall.now += 20 * HOUR
    renewed = rig.signer.resign(baseline_order)
    assert renewed.expires_at > rig.signer.now_ms() and renewed.issued_at == baseline_order.issued_at
    replay = rig.refused(renewed, "contract_violation")
    assert replay.stage == "downgrade" and "replayed directed MODEL" in replay.reason
    # a fresh channel statement never downgrades (set aside, not reported, nothing fetched)
    assert rig.updater.handle(rig.statement(v1, 1)) == (None, None) and rig.updater.pending is None
    assert rig.version() == 3


def test_a_resigned_pending_statement_does_not_restart_its_download(tmp_path: Path, signed_releases) -> None:
    v2 = signed_releases["v2"]
    rig = Rig(tmp_path, signed_releases["v1"])
    first = rig.statement(v2, 2)
    assert rig.updater.announced(first) and rig.updater.due_fetch(True) is not None
    rig.wall.now += 0.8 * HOUR
    renewed = rig.signer.resign(first)
    assert rig.updater.announced(renewed) and rig.updater.pending == renewed
    assert rig.updater.due_fetch(True) is None  # no new FETCH: the running transfer goes on
    rig.wall.now += 0.5 * HOUR  # the first copy has expired by now; the renewed one holds
    report = Sender(v2.archive, version=2).run(rig.updater)
    assert report is not None and report.ok
    current = rig.store.current()
    assert current is not None and current.issued_at == first.issued_at  # the decision's time, not the renewal's
    # a new statement (a later issued_at) is a new announcement: it would start over
    rig2 = Rig(tmp_path / "other", signed_releases["v1"])
    assert rig2.updater.announced(rig2.statement(v2, 2)) and rig2.updater.due_fetch(True) is not None
    rig2.wall.now += 1
    assert rig2.updater.announced(rig2.statement(v2, 2)) and rig2.updater.due_fetch(True) is not None


def test_the_ota_table_parses_the_freshness_keys(tmp_path: Path) -> None:
    key = KEY.public_key.hex()
    keys = parse_ota_table({"trusted_keys": [key], "require_expiry": True, "max_clock_skew_s": 60}, tmp_path)
    assert keys.freshness == FreshnessPolicy(require_expiry=True, max_clock_skew_s=60)
    assert parse_ota_table({"trusted_keys": [key]}, tmp_path).freshness == FreshnessPolicy()
    (tmp_path / "keys").write_text(f"{key}\n")
    from_file = parse_ota_table({"trusted_keys_file": "keys", "max_clock_skew_s": 0}, tmp_path)
    assert from_file.keys == (KEY.public_key,) and from_file.freshness.max_clock_skew_s == 0
    problems: dict[str, dict[str, object]] = {
        "ota.require_expiry: statements are checked only against trusted keys": {"require_expiry": True},
        "ota.require_expiry: expected true or false": {"trusted_keys": [key], "require_expiry": 1},
        "ota.max_clock_skew_s: must be between": {"trusted_keys": [key], "max_clock_skew_s": 86400},
        "unknown key ota.clock_skew_s": {"clock_skew_s": 5},
    }
    for words, table in problems.items():
        with pytest.raises(ConfigError, match=words):
            parse_ota_table(table, tmp_path)
    assert not parse_ota_table({"max_clock_skew_s": 30}, tmp_path)  # no keys: nothing is checked
