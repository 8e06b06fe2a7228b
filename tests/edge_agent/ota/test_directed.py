"""Directed MODELs (a staged rollout's per-device target, docs/protocol.md §8.5) on the device:
they override the channel, may order a downgrade, never re-install a version the device rolled
back itself; an install reports the new and the replaced model's validation metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import BundleError, ConfigError
from edge_agent.ota import DownloadStaging, ModelStore, ModelUpdater
from edge_agent.ota.validation import evaluation_validator, validation_metrics
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from tests.edge_agent.ota import Release, evaluate_loss, sample_inputs
from tests.edge_agent.ota.test_updater import DEVICE, Device, Sender, announcement


def install(device: Device, release: Release, version: int, channel: str) -> None:
    model = announcement(release, version, channel=channel)
    assert device.updater.announced(model)
    report = Sender(release.archive, version=version).run(device.updater)
    assert report is not None and report.ok, report


def test_a_directed_model_overrides_the_channel_and_may_order_a_downgrade(tmp_path, v1, v2, v3) -> None:
    device = Device(tmp_path, v1)
    install(device, v2, 2, "current")
    assert device.updater.announced(announcement(v3, 3, channel=DEVICE)) and device.updater.pending is not None

    # while a directed target is held, the channel's announcements do not count
    assert not device.updater.announced(announcement(v3, 4))
    assert not device.updater.announced(announcement(v1, 1))  # a channel never downgrades
    # the server orders v1 back: accepted although older, installed with the downgrade allowed
    install(device, v1, 1, DEVICE)
    assert device.version() == (1, v1.digest)
    previous = device.store.previous()
    assert previous is not None and previous.version == 2
    # the directed target is what runs: nothing pending
    assert not device.updater.announced(announcement(v1, 1, channel=DEVICE)) and device.updater.pending is None


def test_a_device_never_reinstalls_a_version_it_rolled_back_even_when_directed(tmp_path, v1, v2) -> None:
    device = Device(tmp_path, v1)
    install(device, v2, 2, DEVICE)
    assert device.updater.rollback("non_finite_loss").ok
    assert device.version()[0] == 1

    assert not device.updater.announced(announcement(v2, 2, channel=DEVICE))
    restarted = Device(tmp_path, v1)  # the refusal is on disk
    assert not restarted.updater.announced(announcement(v2, 2, channel=DEVICE))


def test_an_install_reports_the_metrics_of_the_new_and_the_replaced_model(tmp_path, v1, v2) -> None:
    bundle = Bundle.open(v1.directory)
    x = sample_inputs(bundle, n=16)
    y = (x.reshape(len(x), -1).sum(axis=1) > 0).astype("int64") % bundle.manifest.num_classes
    validate = evaluation_validator(x, y)
    device = Device(tmp_path, v1, validate=validate)
    model = announcement(v2, 2)
    assert device.updater.announced(model)

    report = Sender(v2.archive).run(device.updater)

    assert report is not None and report.ok
    assert report.metrics == validate(Bundle.open(v2.directory)) and set(report.metrics) == {"loss", "accuracy"}
    assert report.previous_metrics == validate(Bundle.open(v1.directory))
    assert report.previous_digest == v1.digest and report.metrics != report.previous_metrics


def test_validation_metrics_need_a_finite_loss_and_drop_other_non_finite_values(v1) -> None:
    assert validation_metrics(None) == {}
    assert validation_metrics(0.5) == {"loss": 0.5}
    assert validation_metrics({"loss": 1.0, "accuracy": float("nan")}) == {"loss": 1.0}
    with pytest.raises(BundleError, match="non-finite"):
        validation_metrics({"loss": float("inf"), "accuracy": 0.5})
    with pytest.raises(BundleError, match="no loss"):
        validation_metrics({"accuracy": 0.5})
    assert validation_metrics(evaluate_loss(Bundle.open(v1.directory)))["loss"] > 0


def test_the_device_id_cannot_be_the_followed_channel(tmp_path: Path, v1: Release) -> None:
    store = ModelStore(tmp_path / "s").open()
    with pytest.raises(ConfigError, match="reserved"):
        ModelUpdater("current", Topics(), store, DownloadStaging(tmp_path / "d"), evaluate_loss)
