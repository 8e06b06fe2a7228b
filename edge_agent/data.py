"""Device data: features ``x`` (float32 ``[N, ...]``) and labels ``y`` (int64 classes or float32 targets).

:func:`load_npz` reads the simplest format, one ``.npz`` file with arrays ``x`` and ``y``.
:mod:`edge_agent.datasources` adds ``.npy`` pairs, CSV, image folders and Python callables, a
train/validation split, and disk-backed (memory-mapped) data for sources bigger than RAM.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
    """``x`` and ``y`` may be in memory or memory-mapped (``np.load(..., mmap_mode="r")``).

    Indexing a memory-mapped array with a batch's index array reads only those rows.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_npz(path: str | Path) -> Dataset:
    """Load ``x`` as float32 and ``y`` as int64 (class labels) or float32 (binary / regression targets).

    Raises :class:`ConfigError` with the reason; whether ``y`` fits the model is the trainer's check.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise ConfigError(f"{path}: needs arrays 'x' and 'y', has {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    return dataset_from_arrays(x, y, source=str(path))


def check_arrays(x: np.ndarray, y: np.ndarray, *, source: str) -> np.dtype:
    """Raise :class:`ConfigError` unless ``x``/``y`` can be data; return the dtype ``y`` converts to.

    ``x`` must be numeric ``[N, ...]`` and ``y`` ``[N, ...]`` with integer or float values.
    """
    if x.ndim < 2 or y.ndim < 1 or len(x) != len(y):
        raise ConfigError(f"{source}: x must be [N, ...] and y [N, ...]; got x{list(x.shape)} y{list(y.shape)}")
    if x.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: x must hold numbers, got {x.dtype}")
    if np.issubdtype(y.dtype, np.integer):
        return np.dtype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        return np.dtype(np.float32)
    raise ConfigError(f"{source}: y must hold integer class labels or float targets, got {y.dtype}")


def dataset_from_arrays(x: np.ndarray, y: np.ndarray, *, source: str) -> Dataset:
    """``x`` as contiguous float32 and ``y`` as int64 or float32 (see :func:`check_arrays`)."""
    label_dtype = check_arrays(x, y, source=source)
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=label_dtype))
