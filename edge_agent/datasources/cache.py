"""Disk-backed data: stream chunks into ``.npy`` files once, then memory-map them.

A streaming source (npy, csv, images) yields :class:`Chunk` s of a bounded number of rows. Each
row goes to the train or the validation files as it arrives (:func:`~.split.validation_mask`),
so memory holds one chunk at a time and no full copy of the data is ever made. The ``.npy``
files are written in a single pass: numpy pads every header so the row count can grow in place
(``numpy.lib.format.GROWTH_AXIS_MAX_DIGITS``), so the final count is written over the first
header at the end. The result is loaded with ``np.load(mmap_mode="r")``: the trainer's
``x[index]`` reads only the batch's rows.

Cache entries live in ``cache_dir/<slot>.<key>``: the slot names the source (kind and paths),
the key hashes what the content depends on (file sizes and mtimes, the config). An entry is
built in a temporary folder and renamed into place, so readers never see half an entry; a
rebuilt slot drops its older entries (open memory maps of them stay valid until closed), and
temporary folders left by a build whose process died are removed by the next build.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from edge_agent.data import Dataset
from edge_agent.datasources.split import DataSplit, validation_mask
from edge_agent.errors import ConfigError, StorageError

log = logging.getLogger("fedflock.data")

#: Bump when the layout of a cache entry changes, so old entries are rebuilt.
CACHE_FORMAT = "1"
_PARTS = ("train", "val")


@dataclass(frozen=True)
class Chunk:
    """Consecutive-or-not rows of a source: ``rows`` are their numbers (they choose the split)."""

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray


def file_stamp(path: Path) -> str:
    """``path|size|mtime_ns``: changes whenever the file is replaced or written to."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def digest(parts: Iterable[str]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode())
        sha.update(b"\0")
    return sha.hexdigest()


class NpyAppender:
    """One ``.npy`` file written a chunk at a time; the header is fixed up by :meth:`finish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self._file: BinaryIO | None = None
        self._header_size = 0

    def append(self, chunk: np.ndarray) -> None:
        if self._file is None:
            self._open(tuple(chunk.shape[1:]), chunk.dtype)
        assert self._file is not None
        if tuple(chunk.shape[1:]) != self.row_shape or chunk.dtype != self.dtype:
            raise ValueError(f"chunk {chunk.dtype}{list(chunk.shape)} does not match {self.dtype}{self.row_shape}")
        self._file.write(np.ascontiguousarray(chunk).data)
        self.rows += len(chunk)

    def finish(self, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Write the final row count; an empty file gets ``row_shape``/``dtype`` from the caller."""
        if self._file is None:
            self._open(row_shape, dtype)
        assert self._file is not None and self.row_shape is not None and self.dtype is not None
        header = _header((self.rows, *self.row_shape), self.dtype)
        if len(header) != self._header_size:  # cannot happen below 10**21 rows
            raise StorageError(f"{self.path}: .npy header grew from {self._header_size} to {len(header)} bytes")
        self._file.seek(0)
        self._file.write(header)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.row_shape, self.dtype = row_shape, dtype
        header = _header((0, *row_shape), dtype)
        self._header_size = len(header)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by finish()/close()
        self._file.write(header)


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buffer = io.BytesIO()
    meta = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    npy_format.write_array_header_1_0(buffer, meta)
    return buffer.getvalue()


class SplitWriter:
    """Routes each chunk's rows to ``train_*.npy`` or ``val_*.npy`` in ``directory``."""

    def __init__(self, directory: Path, *, fraction: float, seed: int) -> None:
        self.fraction, self.seed = fraction, seed
        self._files = {f"{part}_{a}": NpyAppender(directory / f"{part}_{a}.npy") for part in _PARTS for a in "xy"}

    def add(self, chunk: Chunk) -> None:
        held_out = validation_mask(chunk.rows, self.fraction, self.seed)
        if not held_out.any():
            self._append("train", chunk.x, chunk.y)
            return
        self._append("val", chunk.x[held_out], chunk.y[held_out])
        keep = ~held_out
        self._append("train", chunk.x[keep], chunk.y[keep])

    def finish(self, *, source: str) -> None:
        train, val = self._files["train_x"].rows, self._files["val_x"].rows
        if train + val == 0:
            raise ConfigError(f"{source}: no data rows")
        if train == 0:
            raise ConfigError(f"{source}: val_fraction {self.fraction} of {val} rows leaves none to train on")
        for axis in "xy":
            files = [self._files[f"{part}_{axis}"] for part in _PARTS]
            shaped = next(f for f in files if f.row_shape is not None)
            assert shaped.row_shape is not None and shaped.dtype is not None
            for file in files:
                file.finish(shaped.row_shape, shaped.dtype)

    def close(self) -> None:
        for file in self._files.values():
            file.close()

    def _append(self, part: str, x: np.ndarray, y: np.ndarray) -> None:
        if len(x):
            self._files[f"{part}_x"].append(x)
            self._files[f"{part}_y"].append(y)


def cached_split(
    cache_dir: Path,
    *,
    identity: Iterable[str],
    content: Iterable[str],
    chunks: Callable[[], Iterator[Chunk]],
    fraction: float,
    seed: int,
    source: str,
) -> DataSplit:
    """The memory-mapped split of ``chunks()``, built once per distinct ``content``.

    ``identity`` names the slot (kind, paths); ``content`` lists everything the data depends on.
    """
    slot = digest([CACHE_FORMAT, *identity])[:16]
    entry = cache_dir / f"{slot}.{digest([*content, repr(fraction), str(seed)])[:16]}"
    if entry.is_dir():
        try:
            split = load_entry(entry, held_out=fraction > 0)
            log.info("data from %s: reusing cache %s", source, entry.name)
            return split
        except StorageError as exc:
            log.warning("data cache %s unreadable (%s); rebuilding", entry, exc.reason)
            _remove(entry)
    _remove_abandoned(cache_dir, slot)
    _build(entry, chunks, fraction=fraction, seed=seed, source=source)
    for old in cache_dir.glob(f"{slot}.*"):
        if old != entry:
            _remove(old)
    return load_entry(entry, held_out=fraction > 0)


def load_entry(entry: Path, *, held_out: bool) -> DataSplit:
    train = _load_part(entry, "train")
    return DataSplit(train=train, validation=_load_part(entry, "val") if held_out else None)


def _load_part(entry: Path, part: str) -> Dataset:
    try:
        x = np.load(entry / f"{part}_x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(entry / f"{part}_y.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read data cache {entry}: {exc}") from exc
    if len(x) != len(y):
        raise StorageError(f"data cache {entry}: {part} has {len(x)} rows of x but {len(y)} of y")
    return Dataset(x, y)


def _build(entry: Path, chunks: Callable[[], Iterator[Chunk]], *, fraction: float, seed: int, source: str) -> None:
    temporary = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir(parents=True)
    except OSError as exc:
        raise StorageError(f"cannot create data cache folder {temporary}: {exc.strerror or exc}") from exc
    writer = SplitWriter(temporary, fraction=fraction, seed=seed)
    try:
        for chunk in chunks():
            writer.add(chunk)
        writer.finish(source=source)
        _publish(temporary, entry)
        log.info("data from %s: cached in %s", source, entry)
    except OSError as exc:
        raise StorageError(f"cannot write data cache {temporary}: {exc.strerror or exc}") from exc
    finally:
        writer.close()
        if temporary.exists():
            _remove(temporary)


def _publish(temporary: Path, entry: Path) -> None:
    """Rename the finished folder into place; another process may have just done the same."""
    try:
        os.rename(temporary, entry)
    except OSError:
        if not entry.is_dir():
            raise
        log.info("data cache %s was built concurrently; using that one", entry.name)


def _remove_abandoned(cache_dir: Path, slot: str) -> None:
    """Drop temporary folders of builds whose process is gone (it crashed or was killed)."""
    for folder in cache_dir.glob(f".tmp-{slot}.*"):
        pid = folder.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove(folder)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove old data cache %s: %s", path, exc)
