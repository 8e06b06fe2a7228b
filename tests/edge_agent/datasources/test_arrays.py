"""Array files: .npz in memory, .npy memory-mapped (directly or through the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import Dataset, dataset_from_arrays, load_npz
from edge_agent.datasources import DataSplit, open_data, parse_data_config
from edge_agent.errors import ConfigError


def _npy(tmp_path: Path, x: np.ndarray, y: np.ndarray, **table: object) -> DataSplit:
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    config = parse_data_config({"kind": "npy", "x_path": "x.npy", "y_path": "y.npy", **table}, base_dir=tmp_path)
    return open_data(config, cache_dir=tmp_path / "cache")


def test_npz_is_loaded_and_split_in_memory(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20, dtype=np.int32))
    config = parse_data_config({"kind": "npz", "path": "d.npz", "val_fraction": 0.25}, base_dir=tmp_path)
    split = open_data(config, cache_dir=tmp_path / "cache")
    assert split.validation is not None and len(split.validation) == 5 and len(split.train) == 15
    assert split.train.x.dtype == np.float32 and split.train.y.dtype == np.int64
    np.testing.assert_array_equal(split.train.x[:, 0], 2 * split.train.y)
    assert not (tmp_path / "cache").exists()


def test_npy_files_that_already_fit_are_memory_mapped_without_a_copy(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((30, 1, 4, 4)).astype(np.float32)
    split = _npy(tmp_path, x, np.arange(30) % 3)
    assert isinstance(split.train.x, np.memmap) and Path(str(split.train.x.filename)) == tmp_path / "x.npy"
    np.testing.assert_array_equal(split.train.x, x)
    assert split.validation is None and not (tmp_path / "cache").exists()


def test_npy_files_needing_conversion_or_a_split_are_streamed_into_the_cache(tmp_path: Path) -> None:
    x = np.arange(2000, dtype=np.float64).reshape(1000, 2)
    y = np.arange(1000, dtype=np.int16)
    split = _npy(tmp_path, x, y, val_fraction=0.2, chunk_rows=64)
    assert split.validation is not None
    assert isinstance(split.train.x, np.memmap) and split.train.x.dtype == np.float32
    assert split.train.y.dtype == np.int64
    labels = np.concatenate([split.train.y, split.validation.y])
    np.testing.assert_array_equal(np.sort(labels), y)
    np.testing.assert_array_equal(split.validation.x[:, 1], 2 * split.validation.y + 1)
    assert len(os.listdir(tmp_path / "cache")) == 1


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((3, 2)), np.zeros(4), r"x must be \[N, ...\] and y \[N, ...\]"),
        (np.zeros(3), np.zeros(3), r"x must be \[N, ...\]"),
        (np.zeros((3, 2)), np.array(["a", "b", "c"]), "y must hold integer class labels or float targets"),
        (np.array([["a"], ["b"]]), np.zeros(2), "x must hold numbers"),
        (np.zeros((0, 2)), np.zeros(0), "no data rows"),
    ],
)
def test_unusable_npy_arrays_are_config_errors(tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _npy(tmp_path, x, y)


def test_unreadable_array_files_are_config_errors(tmp_path: Path) -> None:
    with open(tmp_path / "x.npy", "wb") as file:
        np.savez(file, x=np.zeros(3))  # an archive under an .npy name
    (tmp_path / "y.npy").write_bytes(b"garbage")
    np.save(tmp_path / "good.npy", np.zeros((3, 2)))
    for table, message in [
        ({"kind": "npy", "x_path": "good.npy", "y_path": "missing.npy"}, "cannot read data file .*missing.npy"),
        ({"kind": "npy", "x_path": "x.npy", "y_path": "y.npy"}, "x.npy: not an .npy file"),
        ({"kind": "npz", "path": "y.npy"}, "cannot read data file .*y.npy"),
    ]:
        with pytest.raises(ConfigError, match=message):
            open_data(parse_data_config(table, base_dir=tmp_path), cache_dir=tmp_path)


def test_load_npz_keeps_its_api(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3), np.float64), y=np.array([0.5, 1, 2, 3]))
    data = load_npz(tmp_path / "d.npz")
    assert isinstance(data, Dataset) and len(data) == 4
    assert data.x.dtype == np.float32 and data.y.dtype == np.float32
    np.savez(tmp_path / "bad.npz", features=np.ones((4, 3)))
    with pytest.raises(ConfigError, match=r"needs arrays 'x' and 'y', has \['features'\]"):
        load_npz(tmp_path / "bad.npz")


def test_dataset_from_arrays_converts_without_copying_what_already_fits() -> None:
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    data = dataset_from_arrays(x, y, source="t")
    assert data.x is x and data.y is y
    assert dataset_from_arrays(x.astype(bool), y.astype(np.uint8), source="t").y.dtype == np.int64
