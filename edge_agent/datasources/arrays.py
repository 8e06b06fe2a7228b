"""Array files: one ``.npz`` (``x`` and ``y``, read into memory) or two ``.npy`` files (memory-mapped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge_agent.data import Dataset, check_arrays, load_npz
from edge_agent.datasources.cache import Chunk, cached_split, file_stamp
from edge_agent.datasources.config import DataConfig, NpySource, NpzSource
from edge_agent.datasources.split import DataSplit, split_in_memory
from edge_agent.errors import ConfigError


def open_npz(source: NpzSource, config: DataConfig) -> DataSplit:
    """``.npz`` members cannot be memory-mapped (they are zip entries), so this one is in memory."""
    data = load_npz(source.path)
    return split_in_memory(data, config.val_fraction, config.seed, source=str(source.path))


def open_npy(source: NpySource, config: DataConfig, *, cache_dir: Path) -> DataSplit:
    """Memory-map ``x_path`` and ``y_path``.

    Used as they are when nothing is held out and the dtypes already fit; otherwise streamed
    once, in chunks, into converted and split cache files.
    """
    name = f"{source.x_path} + {source.y_path}"
    x, y = _mmap(source.x_path), _mmap(source.y_path)
    label_dtype = check_arrays(x, y, source=name)
    if len(x) == 0:
        raise ConfigError(f"{name}: no data rows")
    if config.val_fraction == 0 and x.dtype == np.float32 and y.dtype == label_dtype:
        return DataSplit(train=Dataset(x, y), validation=None)

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(x), config.chunk_rows):
            stop = min(start + config.chunk_rows, len(x))
            yield Chunk(
                x=np.asarray(x[start:stop], dtype=np.float32),
                y=np.asarray(y[start:stop], dtype=label_dtype),
                rows=np.arange(start, stop),
            )

    return cached_split(
        cache_dir,
        identity=["npy", str(source.x_path.resolve()), str(source.y_path.resolve())],
        content=[file_stamp(source.x_path), file_stamp(source.y_path), repr(config)],
        chunks=chunks,
        fraction=config.val_fraction,
        seed=config.seed,
        source=name,
    )


def _mmap(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive, whatever its name
        array.close()
        raise ConfigError(f"{path}: not an .npy file")
    return array
