"""Parsing the ``[data]`` table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomllib

from edge_agent.datasources import (
    CallableSource,
    CsvSource,
    DataConfig,
    ImageSource,
    NpySource,
    NpzSource,
    parse_data_config,
)
from edge_agent.errors import ConfigError

TOML = """
[data]
kind = "csv"
path = "readings.csv"
label_column = "label"
feature_columns = ["t", 2]
delimiter = ";"
label_type = "int"
classes = ["ok", "fault"]
skip_bad_rows = true
val_fraction = 0.2
seed = 7
chunk_rows = 64
"""


def test_a_csv_table_from_toml_parses_with_paths_relative_to_the_config_folder(tmp_path: Path) -> None:
    config = parse_data_config(tomllib.loads(TOML)["data"], base_dir=tmp_path)
    assert config == DataConfig(
        source=CsvSource(
            path=tmp_path / "readings.csv",
            label_columns=("label",),
            feature_columns=("t", 2),
            delimiter=";",
            classes=("ok", "fault"),
            skip_bad_rows=True,
        ),
        val_fraction=0.2,
        seed=7,
        chunk_rows=64,
    )


def test_defaults_hold_nothing_out(tmp_path: Path) -> None:
    config = parse_data_config({"kind": "npz", "path": str(tmp_path / "d.npz")})
    assert config == DataConfig(source=NpzSource(path=tmp_path / "d.npz"), val_fraction=0.0, seed=0, chunk_rows=1024)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"kind": "npy", "x_path": "/d/x.npy", "y_path": "/d/y.npy"},
            NpySource(x_path=Path("/d/x.npy"), y_path=Path("/d/y.npy")),
        ),
        (
            {
                "kind": "images",
                "path": "/img",
                "size": [28, 32],
                "color": "grayscale",
                "layout": "nhwc",
                "scale": False,
            },
            ImageSource(path=Path("/img"), size=(28, 32), color="grayscale", layout="nhwc", scale=False),
        ),
        ({"kind": "callable", "function": "pkg.mod:load"}, CallableSource(function="pkg.mod:load")),
        (
            {"kind": "csv", "path": "/a.csv", "label_column": [-2, -1], "label_type": "float", "header": False},
            CsvSource(path=Path("/a.csv"), label_columns=(-2, -1), label_type="float", header=False),
        ),
        (
            {"kind": "csv", "path": "/a.csv", "label_column": 0, "feature_shape": [1, 8, 8]},
            CsvSource(path=Path("/a.csv"), label_columns=(0,), feature_shape=(1, 8, 8)),
        ),
    ],
)
def test_every_kind_parses(table: dict[str, Any], expected: object) -> None:
    assert parse_data_config(table).source == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "npz", "path": "d.npz", "lable_column": "y"}, "unknown key 'lable_column' for kind 'npz'"),
        ({"kind": "images", "path": "p", "size": [8, 8], "delimiter": ","}, "unknown key 'delimiter'"),
        ({"kind": "parquet", "path": "d"}, "kind must be one of npz, npy, csv, images, callable"),
        ({"path": "d.npz"}, "kind must be one of"),
        ({"kind": ["csv"]}, "kind must be one of"),
        ({"kind": "npz"}, "'path' is required"),
        ({"kind": "npy", "x_path": "x.npy"}, "'y_path' is required"),
        ({"kind": "npz", "path": 3}, "path must be str, got int 3"),
        ({"kind": "npz", "path": "d", "val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
        ({"kind": "npz", "path": "d", "val_fraction": -0.1}, "val_fraction must be in [0, 1)"),
        ({"kind": "npz", "path": "d", "seed": True}, "seed must be int, got bool"),
        ({"kind": "npz", "path": "d", "seed": -1}, "seed must be >= 0"),
        ({"kind": "npz", "path": "d", "chunk_rows": 0}, "chunk_rows must be >= 1"),
        ({"kind": "csv", "path": "a.csv"}, "'label_column' is required"),
        ({"kind": "csv", "path": "a.csv", "label_column": ["a", "b"]}, "exactly one label_column"),
        ({"kind": "csv", "path": "a.csv", "label_column": "y", "header": False}, "named only when header = true"),
        ({"kind": "csv", "path": "a.csv", "label_column": 0, "delimiter": "::"}, "one character"),
        (
            {"kind": "csv", "path": "a.csv", "label_column": 0, "label_type": "str"},
            "label_type must be one of int, float",
        ),
        (
            {"kind": "csv", "path": "a.csv", "label_column": 0, "label_type": "float", "classes": ["a"]},
            "needs label_type",
        ),
        ({"kind": "csv", "path": "a.csv", "label_column": 1.5}, "a column is a header name or a 0-based index"),
        ({"kind": "csv", "path": "a.csv", "label_column": 0, "feature_columns": [1, 1]}, "each once"),
        ({"kind": "csv", "path": "a.csv", "label_column": 0, "classes": ["a", "a"]}, "without duplicates"),
        ({"kind": "images", "path": "p"}, "'size' ([height, width]) is required"),
        ({"kind": "images", "path": "p", "size": [8]}, "size must be a list of 2 positive integers"),
        ({"kind": "images", "path": "p", "size": [8, 0]}, "size must be a list of 2 positive integers"),
        ({"kind": "images", "path": "p", "size": "8x8"}, "size must be list"),
        ({"kind": "images", "path": "p", "size": [8, 8], "color": "cmyk"}, "color must be one of rgb, grayscale"),
        ({"kind": "callable", "function": "pkg.mod.load"}, "'package.module:function'"),
    ],
)
def test_bad_tables_are_config_errors_naming_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_data_config(table)
    assert message in info.value.reason
