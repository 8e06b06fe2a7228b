"""Data on the device: pluggable sources, a train/validation split, disk-backed arrays.

Parse the agent config's ``[data]`` table once with :func:`parse_data_config` (its docstring
lists the keys), then :func:`open_data` returns a :class:`DataSplit` of
:class:`~edge_agent.data.Dataset` s that :class:`~edge_agent.runtime.trainer.OrtTrainer` takes.

======== ======================================== ==================================
kind     reads                                    held as
======== ======================================== ==================================
npz      ``x`` and ``y`` of one ``.npz``           memory
npy      two ``.npy`` files                        memory-mapped source or cache
csv      one CSV file with label column(s)        memory-mapped cache (streamed)
images   one subfolder per class (Pillow)         memory-mapped cache (streamed)
callable ``package.module:function``              memory
======== ======================================== ==================================

Streaming sources convert their input once into ``cache_dir`` (see :mod:`.cache`) with memory
bounded by ``chunk_rows``, and reuse it until the source file or the config changes.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.datasources.arrays import open_npy, open_npz
from edge_agent.datasources.callable_source import open_callable
from edge_agent.datasources.config import (
    CallableSource,
    CsvSource,
    DataConfig,
    ImageSource,
    NpySource,
    NpzSource,
    Source,
    parse_data_config,
)
from edge_agent.datasources.csv_source import open_csv
from edge_agent.datasources.images import open_images
from edge_agent.datasources.split import DataSplit, split_in_memory, validation_mask

__all__ = [
    "CallableSource",
    "CsvSource",
    "DataConfig",
    "DataSplit",
    "ImageSource",
    "NpySource",
    "NpzSource",
    "Source",
    "open_data",
    "parse_data_config",
    "split_in_memory",
    "validation_mask",
]


def open_data(config: DataConfig, *, cache_dir: Path) -> DataSplit:
    """Open the configured source; raises :class:`ConfigError` (bad data or config) or
    :class:`StorageError` (the cache could not be written)."""
    source = config.source
    if isinstance(source, NpzSource):
        return open_npz(source, config)
    if isinstance(source, NpySource):
        return open_npy(source, config, cache_dir=cache_dir)
    if isinstance(source, CsvSource):
        return open_csv(source, config, cache_dir=cache_dir)
    if isinstance(source, ImageSource):
        return open_images(source, config, cache_dir=cache_dir)
    return open_callable(source, config)
