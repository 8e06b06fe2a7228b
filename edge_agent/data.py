"""Device data: an ``.npz`` file with ``x`` (features) and ``y`` (integer class labels, or float targets)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import ConfigError


@dataclass(frozen=True)
class Dataset:
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
    if x.ndim < 2 or y.ndim < 1 or len(x) != len(y):
        raise ConfigError(f"{path}: x must be [N, ...] and y [N, ...]; got x{list(x.shape)} y{list(y.shape)}")
    if np.issubdtype(y.dtype, np.integer):
        labels = np.ascontiguousarray(y, dtype=np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        labels = np.ascontiguousarray(y, dtype=np.float32)
    else:
        raise ConfigError(f"{path}: y must hold integer class labels or float targets, got {y.dtype}")
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), labels)
