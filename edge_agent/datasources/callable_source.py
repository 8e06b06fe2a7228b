"""A Python function that returns the data: ``function = "package.module:function"``.

The function takes no arguments and returns ``(x, y)`` arrays or a :class:`~edge_agent.data.Dataset`.
It runs in the agent's process, so whatever it raises is reported as a :class:`ConfigError`.
The result is held in memory (return memory-mapped arrays to keep a large set on disk; a
validation split then copies the rows it selects).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.data import Dataset, dataset_from_arrays
from edge_agent.datasources.config import CallableSource, DataConfig
from edge_agent.datasources.split import DataSplit, split_in_memory
from edge_agent.errors import ConfigError


def open_callable(source: CallableSource, config: DataConfig) -> DataSplit:
    data = call_data_function(source.function)
    return split_in_memory(data, config.val_fraction, config.seed, source=source.function)


def call_data_function(spec: str) -> Dataset:
    function = resolve_function(spec)
    try:
        result = function()
    except Exception as exc:  # user code: any failure is a configuration problem to report
        raise ConfigError(f"data function {spec} failed: {type(exc).__name__}: {exc}") from exc
    return as_dataset(result, source=spec)


def resolve_function(spec: str) -> Callable[[], Any]:
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"data function {spec}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module's own top-level code failed
        raise ConfigError(f"data function {spec}: importing {module_name!r} failed: {exc!r}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"data function {spec}: {module_name!r} has no function {name!r}")
    return function


def as_dataset(result: Any, *, source: str) -> Dataset:
    if isinstance(result, Dataset):
        x, y = result.x, result.y
    elif isinstance(result, tuple | list) and len(result) == 2:
        x, y = result
    else:
        raise ConfigError(f"data function {source} must return (x, y) or a Dataset, got {type(result).__name__}")
    try:
        x_array, y_array = np.asarray(x), np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data function {source}: x and y must be arrays: {exc}") from exc
    return dataset_from_arrays(x_array, y_array, source=f"data function {source}")
