"""CSV with a label column, streamed: memory holds ``chunk_rows`` rows, whatever the file's size.

Rows are parsed with the :mod:`csv` module (quoting, any one-character delimiter, UTF-8 with or
without a BOM) and converted a chunk at a time with one numpy call; only a chunk that fails is
looked at row by row, to name the bad line. Blank lines are ignored. A bad row (wrong number
of fields, a value that is not a finite number, a label that is not a class) is a
:class:`ConfigError` naming the file and line, or, with ``skip_bad_rows``, left out and counted
in a warning.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_agent.datasources.bad_rows import BadRows
from edge_agent.datasources.cache import Chunk, cached_split, file_stamp
from edge_agent.datasources.config import Column, CsvSource, DataConfig
from edge_agent.datasources.split import DataSplit
from edge_agent.errors import ConfigError

#: Upper bound on the fields parsed per chunk (about 60 bytes of memory each), whatever ``chunk_rows`` says.
CHUNK_FIELDS = 1 << 16


def open_csv(source: CsvSource, config: DataConfig, *, cache_dir: Path) -> DataSplit:
    return cached_split(
        cache_dir,
        identity=["csv", str(source.path.resolve())],
        content=[file_stamp(source.path), repr(config)],
        chunks=lambda: read_chunks(source, config.chunk_rows),
        fraction=config.val_fraction,
        seed=config.seed,
        source=str(source.path),
    )


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Which fields are features and which are labels, resolved against the header or first row."""

    width: int
    names: tuple[str, ...]
    features: tuple[int, ...]
    labels: tuple[int, ...]


def read_chunks(source: CsvSource, chunk_rows: int) -> Iterator[Chunk]:
    """Yield the file's good rows as chunks; errors are :class:`ConfigError` naming the line."""
    path = source.path
    try:
        with open(path, "rb") as file:
            reader = csv.reader(_text_lines(file), delimiter=source.delimiter)
            try:
                yield from _chunks(reader, source, chunk_rows)
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}, line {reader.line_num + 1}: not UTF-8 text ({exc.reason})") from exc
            except csv.Error as exc:
                raise ConfigError(f"{path}, line {reader.line_num}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror or exc}") from exc


def _text_lines(file: BinaryIO) -> Iterator[str]:
    """Decode line by line (not in 8 KiB blocks) so a decoding error has a line number."""
    for number, line in enumerate(file):
        text = line.decode("utf-8")
        yield text.removeprefix("\ufeff") if number == 0 else text


def _chunks(reader: Iterator[list[str]], source: CsvSource, chunk_rows: int) -> Iterator[Chunk]:
    bad = BadRows(str(source.path), source.skip_bad_rows)
    layout: Layout | None = None
    if source.header:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{source.path}: empty file (expected a header row)")
        layout = resolve_layout(source, [name.strip() for name in header])
    batch = _Batch()
    ordinal, limit = 0, chunk_rows if layout is None else _chunk_limit(chunk_rows, layout)
    for row in reader:
        if not row:
            continue
        if layout is None:
            layout = resolve_layout(source, [str(i) for i in range(len(row))])
            limit = _chunk_limit(chunk_rows, layout)
        line = reader.line_num  # type: ignore[attr-defined]
        if len(row) != layout.width:
            bad.report_line(line, f"{len(row)} fields, expected {layout.width}")
        else:
            batch.add(row, line, ordinal)
        ordinal += 1
        if len(batch.rows) == limit:
            yield from batch.take(layout, source, bad)
    if layout is not None:
        yield from batch.take(layout, source, bad)
    bad.log_summary()


def _chunk_limit(chunk_rows: int, layout: Layout) -> int:
    """Rows per chunk: ``chunk_rows``, fewer for wide files (every field is a Python string)."""
    return max(1, min(chunk_rows, CHUNK_FIELDS // layout.width))


def resolve_layout(source: CsvSource, names: list[str]) -> Layout:
    """Map the configured columns (names or indices, negative from the end) to field indices."""
    width = len(names)
    labels = tuple(_index(source, names, c) for c in source.label_columns)
    if source.feature_columns is None:
        features = tuple(i for i in range(width) if i not in labels)
    else:
        features = tuple(_index(source, names, c) for c in source.feature_columns)
    if not features:
        raise ConfigError(f"{source.path}: no feature columns left besides the label")
    overlap = sorted(set(features) & set(labels))
    if overlap or len(set(features)) != len(features):
        raise ConfigError(f"{source.path}: column {names[(overlap or features)[0]]!r} is used twice")
    shape = source.feature_shape
    if shape is not None and int(np.prod(shape)) != len(features):
        raise ConfigError(f"{source.path}: feature_shape {list(shape)} does not hold {len(features)} features")
    return Layout(width=width, names=tuple(names), features=features, labels=labels)


def _index(source: CsvSource, names: list[str], column: Column) -> int:
    if isinstance(column, str):
        if column not in names:
            raise ConfigError(f"{source.path}: no column {column!r} in the header ({', '.join(names)})")
        return names.index(column)
    if not -len(names) <= column < len(names):
        raise ConfigError(f"{source.path}: column index {column} out of range for {len(names)} fields")
    return column % len(names)


@dataclass
class _Batch:
    """Up to ``chunk_rows`` raw rows with their line numbers and row numbers."""

    rows: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    ordinals: list[int] = field(default_factory=list)

    def add(self, row: list[str], line: int, ordinal: int) -> None:
        self.rows.append(row)
        self.lines.append(line)
        self.ordinals.append(ordinal)

    def take(self, layout: Layout, source: CsvSource, bad: BadRows) -> Iterator[Chunk]:
        """Convert and empty the batch; yields nothing when every row was bad (or there were none)."""
        chunk = convert(self, layout, source, bad) if self.rows else None
        self.rows, self.lines, self.ordinals = [], [], []
        if chunk is not None:
            yield chunk


def convert(batch: _Batch, layout: Layout, source: CsvSource, bad: BadRows) -> Chunk | None:
    """Features as float32 (reshaped to ``feature_shape``), labels as int64 classes or float32 targets."""
    numeric = layout.features + (layout.labels if source.classes is None else ())
    picker = _picker(numeric)
    picked = [picker(row) for row in batch.rows]
    values, ok = _numbers(picked, [layout.names[i] for i in numeric], batch.lines, bad)
    for index in np.flatnonzero(ok & ~np.isfinite(values).all(axis=1)):
        bad.report_line(batch.lines[index], "a value is not finite (nan or inf)")
        ok[index] = False
    if source.classes is not None:
        labels = _class_names(batch, layout.labels[0], source.classes, ok, bad)
    elif source.label_type == "int":
        labels = _class_numbers(values[:, -1], batch.lines, ok, bad)
    else:
        labels = values[:, len(layout.features) :]
    if not ok.any():
        return None
    x = values[ok, : len(layout.features)]
    if source.feature_shape is not None:
        x = x.reshape(len(x), *source.feature_shape)
    return Chunk(x=x, y=np.ascontiguousarray(labels[ok]), rows=np.array(batch.ordinals, dtype=np.int64)[ok])


def _numbers(
    picked: list[Sequence[str]], names: list[str], lines: list[int], bad: BadRows
) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[n, k]`` and a mask of the rows that parsed; the slow path only for a failing chunk."""
    ok = np.ones(len(picked), dtype=bool)
    try:
        return np.array(picked, dtype=np.float32).reshape(len(picked), len(names)), ok
    except ValueError:
        values = np.zeros((len(picked), len(names)), dtype=np.float32)
    for index, fields in enumerate(picked):
        try:
            values[index] = np.array(fields, dtype=np.float32)
        except ValueError:
            ok[index] = False
            bad.report_line(lines[index], _not_a_number(fields, names))
    return values, ok


def _not_a_number(fields: Sequence[str], names: list[str]) -> str:
    for name, value in zip(names, fields, strict=True):
        try:
            float(value)
        except ValueError:
            return f"column {name!r}: {value!r} is not a number"
    return "a value is not a number"


def _class_numbers(values: np.ndarray, lines: list[int], ok: np.ndarray, bad: BadRows) -> np.ndarray:
    for index in np.flatnonzero(ok & ((values != np.round(values)) | (values < 0))):
        bad.report_line(lines[index], f"label {values[index]:g} is not a class index (an integer >= 0)")
        ok[index] = False
    return np.where(ok, values, 0).astype(np.int64)


def _class_names(batch: _Batch, column: int, classes: tuple[str, ...], ok: np.ndarray, bad: BadRows) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.zeros(len(batch.rows), dtype=np.int64)
    for row_index, row in enumerate(batch.rows):
        name = row[column].strip()
        if name in index:
            labels[row_index] = index[name]
        elif ok[row_index]:
            ok[row_index] = False
            bad.report_line(batch.lines[row_index], f"label {name!r} is not one of the classes {list(classes)}")
    return labels


def _picker(indices: Sequence[int]) -> Callable[[list[str]], Sequence[str]]:
    if len(indices) == 1:
        only = indices[0]
        return lambda row: (row[only],)
    return itemgetter(*indices)
