"""The ``[data]`` table of the agent's TOML config, parsed once into frozen dataclasses.

Keys shared by every kind::

    kind          "npz" | "npy" | "csv" | "images" | "callable"   (required)
    val_fraction  share of rows held out for validation, in [0, 1)  (default 0: all rows train)
    seed          integer >= 0 choosing which rows are held out      (default 0)
    chunk_rows    rows parsed per step by the streaming sources      (default 1024)

Per kind (relative paths are resolved against ``base_dir``, normally the config file's folder)::

    npz       path
    npy       x_path, y_path
    csv       path, label_column (name or index, or a list of them for float targets),
              feature_columns (default: all others), delimiter (","), header (true),
              label_type ("int" | "float"), classes (label strings -> class index),
              feature_shape (reshape each row, e.g. [1, 8, 8]), skip_bad_rows (false)
    images    path (one subfolder per class), size ([H, W], required), classes (default: sorted
              subfolder names), color ("rgb" | "grayscale"), scale (true: values in [0, 1]),
              layout ("nchw" | "nhwc"), skip_bad_rows (false)
    callable  function ("package.module:function", returns (x, y) or a Dataset)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from edge_agent.errors import ConfigError

Column = str | int
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class NpzSource:
    path: Path


@dataclass(frozen=True, kw_only=True)
class NpySource:
    x_path: Path
    y_path: Path


@dataclass(frozen=True, kw_only=True)
class CsvSource:
    path: Path
    #: one column for class labels; one or more for float targets (y is then [N, k])
    label_columns: tuple[Column, ...]
    feature_columns: tuple[Column, ...] | None = None
    delimiter: str = ","
    header: bool = True
    label_type: Literal["int", "float"] = "int"
    classes: tuple[str, ...] | None = None
    feature_shape: tuple[int, ...] | None = None
    skip_bad_rows: bool = False


@dataclass(frozen=True, kw_only=True)
class ImageSource:
    path: Path
    size: tuple[int, int]
    classes: tuple[str, ...] | None = None
    color: Literal["rgb", "grayscale"] = "rgb"
    scale: bool = True
    layout: Literal["nchw", "nhwc"] = "nchw"
    skip_bad_rows: bool = False


@dataclass(frozen=True, kw_only=True)
class CallableSource:
    function: str


Source = NpzSource | NpySource | CsvSource | ImageSource | CallableSource


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: Source
    val_fraction: float = 0.0
    seed: int = 0
    chunk_rows: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"[data] val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ConfigError(f"[data] seed must be >= 0, got {self.seed}")
        if self.chunk_rows < 1:
            raise ConfigError(f"[data] chunk_rows must be >= 1, got {self.chunk_rows}")


_COMMON = {"kind", "val_fraction", "seed", "chunk_rows"}
_KEYS: dict[str, set[str]] = {
    "npz": {"path"},
    "npy": {"x_path", "y_path"},
    "csv": {
        "path",
        "label_column",
        "feature_columns",
        "delimiter",
        "header",
        "label_type",
        "classes",
        "feature_shape",
        "skip_bad_rows",
    },
    "images": {"path", "size", "classes", "color", "scale", "layout", "skip_bad_rows"},
    "callable": {"function"},
}


def parse_data_config(table: Mapping[str, Any], *, base_dir: Path | None = None) -> DataConfig:
    """Parse the ``[data]`` table; raise :class:`ConfigError` naming the first bad or unknown key."""
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise ConfigError(f"[data] kind must be one of {', '.join(_KEYS)}; got {kind!r}")
    unknown = sorted(set(table) - _COMMON - _KEYS[kind])
    if unknown:
        allowed = ", ".join(sorted(_COMMON | _KEYS[kind]))
        raise ConfigError(f"[data] unknown key {unknown[0]!r} for kind {kind!r} (allowed: {allowed})")
    reader = _Reader(table, base_dir or Path("."))
    source = _PARSERS[kind](reader)
    return DataConfig(
        source=source,
        val_fraction=reader.get("val_fraction", float, 0.0),
        seed=reader.get("seed", int, 0),
        chunk_rows=reader.get("chunk_rows", int, 1024),
    )


class _Reader:
    """Typed access to the table's values, with errors that name the key."""

    def __init__(self, table: Mapping[str, Any], base_dir: Path) -> None:
        self.table = table
        self.base_dir = base_dir

    def get(self, key: str, kind: type[T], default: T) -> T:
        return _typed(key, self.table[key], kind) if key in self.table else default

    def required(self, key: str, kind: type[T]) -> T:
        if key not in self.table:
            raise ConfigError(f"[data] {key!r} is required for kind {self.table['kind']!r}")
        return _typed(key, self.table[key], kind)

    def path(self, key: str) -> Path:
        path = Path(self.required(key, str)).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise ConfigError(f"[data] {key} must be one of {', '.join(options)}; got {value!r}")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        values = self._list(key)
        if values is None:
            return None
        items = tuple(_typed(key, v, str) for v in values)
        if not items or len(set(items)) != len(items):
            raise ConfigError(f"[data] {key} must be a non-empty list without duplicates")
        return items

    def ints(self, key: str, length: int | None = None) -> tuple[int, ...] | None:
        values = self._list(key)
        if values is None:
            return None
        items = tuple(_typed(key, v, int) for v in values)
        if not items or min(items) < 1 or (length is not None and len(items) != length):
            count = f"{length} " if length else ""
            raise ConfigError(f"[data] {key} must be a list of {count}positive integers, got {values!r}")
        return items

    def _list(self, key: str) -> list[Any] | None:
        return _typed(key, self.table[key], list) if key in self.table else None

    def columns(self, key: str) -> tuple[Column, ...] | None:
        value = self.table.get(key)
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        columns = tuple(_column(key, v) for v in items)
        if not columns or len(set(columns)) != len(columns):
            raise ConfigError(f"[data] {key} must name at least one column, each once")
        return columns


def _typed(key: str, value: Any, kind: type[T]) -> T:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"[data] {key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _column(key: str, value: Any) -> Column:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"[data] {key}: a column is a header name or a 0-based index, got {value!r}")
    return value


def _npz(r: _Reader) -> NpzSource:
    return NpzSource(path=r.path("path"))


def _npy(r: _Reader) -> NpySource:
    return NpySource(x_path=r.path("x_path"), y_path=r.path("y_path"))


def _csv(r: _Reader) -> CsvSource:
    labels = r.columns("label_column")
    if labels is None:
        raise ConfigError("[data] 'label_column' is required for kind 'csv'")
    label_type = r.choice("label_type", ("int", "float"), "int")
    classes = r.strings("classes")
    if label_type == "int" and len(labels) != 1:
        raise ConfigError("[data] class labels (label_type = 'int') come from exactly one label_column")
    if classes is not None and label_type != "int":
        raise ConfigError("[data] classes map label strings to class indices: needs label_type = 'int'")
    header = r.get("header", bool, True)
    if not header and any(isinstance(c, str) for c in labels + (r.columns("feature_columns") or ())):
        raise ConfigError("[data] columns can be named only when header = true; use 0-based indices")
    delimiter = r.get("delimiter", str, ",")
    if len(delimiter) != 1:
        raise ConfigError(f"[data] delimiter must be one character, got {delimiter!r}")
    return CsvSource(
        path=r.path("path"),
        label_columns=labels,
        feature_columns=r.columns("feature_columns"),
        delimiter=delimiter,
        header=header,
        label_type="int" if label_type == "int" else "float",
        classes=classes,
        feature_shape=r.ints("feature_shape"),
        skip_bad_rows=r.get("skip_bad_rows", bool, False),
    )


def _images(r: _Reader) -> ImageSource:
    size = r.ints("size", 2)
    if size is None:
        raise ConfigError("[data] 'size' ([height, width]) is required for kind 'images'")
    return ImageSource(
        path=r.path("path"),
        size=(size[0], size[1]),
        classes=r.strings("classes"),
        color="rgb" if r.choice("color", ("rgb", "grayscale"), "rgb") == "rgb" else "grayscale",
        scale=r.get("scale", bool, True),
        layout="nchw" if r.choice("layout", ("nchw", "nhwc"), "nchw") == "nchw" else "nhwc",
        skip_bad_rows=r.get("skip_bad_rows", bool, False),
    )


def _callable(r: _Reader) -> CallableSource:
    function = r.required("function", str)
    module, sep, name = function.partition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(f"[data] function must look like 'package.module:function', got {function!r}")
    return CallableSource(function=function)


_PARSERS: dict[str, Callable[[_Reader], Source]] = {
    "npz": _npz,
    "npy": _npy,
    "csv": _csv,
    "images": _images,
    "callable": _callable,
}
