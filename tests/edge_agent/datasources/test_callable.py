"""Python callables as data sources: ``function = "module:function"``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.datasources import open_data, parse_data_config
from edge_agent.datasources.split import DataSplit
from edge_agent.errors import ConfigError

MODULE = """
import numpy as np
from edge_agent.data import Dataset

def pair():
    return np.arange(20.0).reshape(10, 2), np.arange(10) % 2

def dataset():
    return Dataset(np.ones((4, 3), np.float32), np.array([0.5, 1.5, 2.5, 3.5]))

def broken():
    raise RuntimeError("sensor offline")

def wrong():
    return {"x": 1}

def ragged():
    return [[1, 2], [3]], [0, 1]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"fedflock_test_data_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    (tmp_path / "fails_on_import.py").write_text("raise ValueError('bad config at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fails_on_import", raising=False)
    return name


def _open(function: str, tmp_path: Path, **table: object) -> DataSplit:
    config = parse_data_config({"kind": "callable", "function": function, **table})
    return open_data(config, cache_dir=tmp_path / "cache")


def test_a_function_returning_x_and_y_is_converted_and_split(module: str, tmp_path: Path) -> None:
    split = _open(f"{module}:pair", tmp_path, val_fraction=0.3, seed=1)
    assert split.validation is not None and (len(split.train), len(split.validation)) == (7, 3)
    assert split.train.x.dtype == np.float32 and split.train.y.dtype == np.int64
    np.testing.assert_array_equal(split.train.y, (split.train.x[:, 0] / 2) % 2)


def test_a_function_returning_a_dataset_keeps_float_targets(module: str, tmp_path: Path) -> None:
    split = _open(f"{module}:dataset", tmp_path)
    assert split.validation is None
    np.testing.assert_array_equal(split.train.y, [0.5, 1.5, 2.5, 3.5])
    assert split.train.y.dtype == np.float32


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("{m}:broken", "data function {m}:broken failed: RuntimeError: sensor offline"),
        ("{m}:wrong", "must return (x, y) or a Dataset, got dict"),
        ("{m}:ragged", "x and y must be arrays"),
        ("{m}:missing", "has no function 'missing'"),
        ("{m}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
        ("no_such_module_for_fedflock:load", "cannot import 'no_such_module_for_fedflock'"),
        ("fails_on_import:load", "importing 'fails_on_import' failed: ValueError('bad config at import')"),
    ],
)
def test_failures_are_config_errors(module: str, tmp_path: Path, function: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _open(function.format(m=module), tmp_path)
    assert message.format(m=module) in info.value.reason
