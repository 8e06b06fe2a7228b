"""Shared test data: the digits bundle (exported once per session) and per-device data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import Dataset
from edge_agent.runtime.bundle import Bundle
from fedflock.datasets import dirichlet_partition, load_digits_arrays, train_test_split


def export_digits_bundle(directory: Path) -> Bundle:
    import torch

    from model_export.exporter import export_bundle
    from model_export.models import digits_cnn

    torch.manual_seed(0)
    return Bundle.open(export_bundle(digits_cnn(10), input_shape=(1, 8, 8), num_classes=10, out_dir=directory, lr=0.05))


def digits_split(num_devices: int, *, alpha: float = 0.5, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    train, test = train_test_split(y, 0.2, rng)
    parts = dirichlet_partition(y[train], num_devices, alpha, rng, min_size=8)
    devices = [Dataset(x[train][idx], y[train][idx]) for idx in parts]
    return devices, Dataset(x[test], y[test])


def write_npz(path: Path, data: Dataset) -> Path:
    np.savez(path, x=data.x, y=data.y)
    return path


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The server tests' MLP with BatchNorm and FedProx (tests/broker_server/fake_fleet.py), exported once."""
    from tests.broker_server.fake_fleet import export_mlp_bundle

    return export_mlp_bundle(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The demo CNN exported once per test session (export takes ~10 s)."""
    return export_digits_bundle(tmp_path_factory.mktemp("bundle") / "digits")
