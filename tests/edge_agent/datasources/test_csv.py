"""CSV sources: label columns, feature selection, bad rows, streaming into the cache."""

from __future__ import annotations

import logging
import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.datasources import DataSplit, open_data, parse_data_config, validation_mask
from edge_agent.errors import ConfigError

ROWS = "t,h,label\n1.5,10,0\n2.5,20,1\n3.5,30,2\n4.5,40,1\n"


def _open(tmp_path: Path, text: str | bytes, **table: Any) -> DataSplit:
    path = tmp_path / "data.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    config = parse_data_config({"kind": "csv", "path": "data.csv", **table}, base_dir=tmp_path)
    return open_data(config, cache_dir=tmp_path / "cache")


def test_label_column_by_name_gives_memory_mapped_float32_features_and_int64_classes(tmp_path: Path) -> None:
    train = _open(tmp_path, ROWS, label_column="label").train
    assert isinstance(train.x, np.memmap) and isinstance(train.y, np.memmap)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_array_equal(train.x, [[1.5, 10], [2.5, 20], [3.5, 30], [4.5, 40]])
    np.testing.assert_array_equal(train.y, [0, 1, 2, 1])


@pytest.mark.parametrize("label", [0, -3])
def test_label_column_by_index_without_a_header(tmp_path: Path, label: int) -> None:
    train = _open(tmp_path, "0,1,2\n1,3,4\n", label_column=label, header=False).train
    np.testing.assert_array_equal(train.x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(train.y, [0, 1])


def test_feature_columns_choose_and_order_the_features(tmp_path: Path) -> None:
    train = _open(tmp_path, ROWS, label_column=2, feature_columns=["h", 0]).train
    np.testing.assert_array_equal(train.x[:2], [[10, 1.5], [20, 2.5]])


def test_float_targets_from_one_or_more_columns_are_float32_n_by_k(tmp_path: Path) -> None:
    one = _open(tmp_path, ROWS, label_column="label", label_type="float").train
    assert one.y.dtype == np.float32 and one.y.shape == (4, 1)
    two = _open(tmp_path, "a,b,c\n1,0.25,-3\n2,0.5,7\n", label_column=["b", "c"], label_type="float").train
    np.testing.assert_array_equal(two.y, [[0.25, -3], [0.5, 7]])
    np.testing.assert_array_equal(two.x, [[1], [2]])


def test_class_names_map_to_their_index_in_classes(tmp_path: Path) -> None:
    text = "v,state\n1,fault\n2,ok\n3, ok \n"
    train = _open(tmp_path, text, label_column="state", classes=["ok", "fault"]).train
    np.testing.assert_array_equal(train.y, [1, 0, 0])


def test_feature_shape_reshapes_each_row(tmp_path: Path) -> None:
    train = _open(tmp_path, "y,a,b,c,d\n1,1,2,3,4\n", label_column="y", feature_shape=[1, 2, 2]).train
    assert train.x.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(train.x[0, 0], [[1, 2], [3, 4]])


def test_delimiter_quotes_blank_lines_and_a_bom(tmp_path: Path) -> None:
    text = '\ufeff"a";"label"\n"1.5";1\n\n  2 ;0\n'
    train = _open(tmp_path, text.encode(), label_column="label", delimiter=";").train
    np.testing.assert_array_equal(train.x, [[1.5], [2]])


def test_chunks_stream_into_the_same_rows_and_split_by_row_number(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-1000, 1000, (503, 3)).astype(np.float32) / 8
    y = rng.integers(0, 5, 503)
    text = "a,b,c,y\n" + "".join(f"{a},{b},{c},{label}\n" for (a, b, c), label in zip(x, y, strict=True))
    split = _open(tmp_path, text, label_column="y", chunk_rows=7, val_fraction=0.3, seed=5)
    held = validation_mask(np.arange(503), 0.3, seed=5)
    assert split.validation is not None
    np.testing.assert_array_equal(split.validation.x, x[held])
    np.testing.assert_array_equal(split.validation.y, y[held])
    np.testing.assert_array_equal(split.train.x, x[~held])
    np.testing.assert_array_equal(split.train.y, y[~held])


@pytest.mark.parametrize(
    ("text", "table", "message"),
    [
        ("a,y\n1,0\n\n2,1,5\n", {}, "data.csv, line 4: 3 fields, expected 2"),
        ("a,y\n1,0\n2x,1\n", {}, "data.csv, line 3: column 'a': '2x' is not a number"),
        ("a,y\n1,0\n,1\n", {}, "line 3: column 'a': '' is not a number"),
        ("a,y\nnan,0\n", {}, "line 2: a value is not finite"),
        ("a,y\n1,1.5\n", {}, "line 2: label 1.5 is not a class index"),
        ("a,y\n1,-1\n", {}, "line 2: label -1 is not a class index"),
        ("a,y\n1,cat\n", {"classes": ["dog"]}, "line 2: label 'cat' is not one of the classes ['dog']"),
        ("a,y\n1,0\n", {"label_column": "z"}, "no column 'z' in the header (a, y)"),
        ("a,y\n1,0\n", {"label_column": 2}, "column index 2 out of range for 2 fields"),
        ("a,y\n1,0\n", {"feature_columns": ["y"]}, "column 'y' is used twice"),
        ("a,y\n1,0\n", {"feature_shape": [2]}, "feature_shape [2] does not hold 1 features"),
        ("", {}, "empty file (expected a header row)"),
        ("a,y\n\n", {}, "data.csv: no data rows"),
        (b"a,y\n1,0\n\xff,1\n", {}, "line 3: not UTF-8 text"),
        ("a,y\n1,0\n" + "1" * 200_000 + ",1\n", {}, "line 3: field larger than field limit"),
    ],
)
def test_bad_data_is_a_config_error_naming_file_and_line(
    tmp_path: Path, text: str | bytes, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _open(tmp_path, text, **({"label_column": "y"} | table))
    assert message in info.value.reason
    assert not list((tmp_path / "cache").glob("*/train_x.npy"))  # no half-built entry


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    config = parse_data_config({"kind": "csv", "path": str(tmp_path / "nope.csv"), "label_column": 0})
    with pytest.raises(ConfigError, match=r"cannot read data file .*nope\.csv"):
        open_data(config, cache_dir=tmp_path)


def test_skip_bad_rows_leaves_them_out_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "a,y\n1,0\nx,1\n2,1\n3\n4,0,0\n5,1\n"
    with caplog.at_level(logging.WARNING, logger="fedflock.data"):
        train = _open(tmp_path, text, label_column="y", skip_bad_rows=True, chunk_rows=2).train
    np.testing.assert_array_equal(train.x[:, 0], [1, 2, 5])
    np.testing.assert_array_equal(train.y, [0, 1, 1])
    (record,) = caplog.records
    assert "skipped 3 bad rows" in record.getMessage() and "line 3" in record.getMessage()


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    assert len(_open(tmp_path, ROWS, label_column="label").train) == 4
    first = os.listdir(tmp_path / "cache")
    assert len(_open(tmp_path, ROWS + "5.5,50,0\n", label_column="label").train) == 5
    assert len(os.listdir(tmp_path / "cache")) == 1 and os.listdir(tmp_path / "cache") != first


def test_a_large_csv_converts_with_memory_far_below_its_size(tmp_path: Path) -> None:
    rows, cols = 40_000, 32  # tracemalloc makes parsing ~5x slower; 200k rows measured 0.12 at chunk_rows 1024
    block = np.random.default_rng(0).integers(0, 10_000, (1000, cols + 1)) / 100
    block[:, -1] = np.arange(1000) % 10
    lines = "\n".join(",".join(f"{v:g}" for v in row) for row in block) + "\n"
    with open(tmp_path / "big.csv", "w") as file:
        file.write(",".join(f"c{i}" for i in range(cols)) + ",label\n")
        for _ in range(rows // 1000):
            file.write(lines)
    config = parse_data_config(
        {"kind": "csv", "path": str(tmp_path / "big.csv"), "label_column": "label", "chunk_rows": 128}
    )
    tracemalloc.start()
    try:
        split = open_data(config, cache_dir=tmp_path / "cache")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data_bytes = rows * cols * 4
    assert peak < data_bytes / 4, f"peak {peak / 1e6:.1f} MB for {data_bytes / 1e6:.1f} MB of features"
    assert split.train.x.shape == (rows, cols)
    np.testing.assert_array_equal(split.train.x[-1000:], block[:, :cols].astype(np.float32))
    np.testing.assert_array_equal(split.train.y[:1000], block[:, -1].astype(np.int64))
