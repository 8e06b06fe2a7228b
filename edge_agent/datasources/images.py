"""An image folder: ``root/<class>/**/<image>``, decoded with Pillow (optional) and streamed to the cache.

Class indices follow ``classes`` when given (other subfolders are ignored), else the sorted
subfolder names. Every image is converted to RGB or grayscale, resized to ``size`` (bilinear),
scaled to [0, 1] unless ``scale = false`` (then 0..255) and laid out channels-first (``nchw``,
what exported PyTorch models take) or channels-last. An image's split side comes from a hash
of its path inside ``root``, so adding images never moves an existing one across the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from edge_agent.datasources.bad_rows import BadRows
from edge_agent.datasources.cache import Chunk, cached_split, file_stamp
from edge_agent.datasources.config import DataConfig, ImageSource
from edge_agent.datasources.split import DataSplit
from edge_agent.errors import ConfigError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
#: Upper bound on one chunk of decoded images, whatever ``chunk_rows`` says.
CHUNK_BYTES = 4 << 20


def open_images(source: ImageSource, config: DataConfig, *, cache_dir: Path) -> DataSplit:
    image_module = pillow()
    files = list_images(source)
    return cached_split(
        cache_dir,
        identity=["images", str(source.path.resolve())],
        content=[*(file_stamp(path) for path, _ in files), repr(config)],
        chunks=lambda: read_chunks(files, source, config.chunk_rows, image_module),
        fraction=config.val_fraction,
        seed=config.seed,
        source=str(source.path),
    )


def pillow() -> ModuleType:
    """``PIL.Image``, or a :class:`ConfigError` saying how to get it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("image folders need Pillow: pip install pillow") from exc
    return Image


def list_images(source: ImageSource) -> list[tuple[Path, int]]:
    """``(file, class index)`` for every image, class by class, files in sorted order."""
    root = source.path
    try:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = source.classes if source.classes is not None else tuple(folders)
        missing = [name for name in classes if name not in folders]
        if missing:
            raise ConfigError(f"{root}: no folder for class {missing[0]!r} (folders: {', '.join(folders)})")
        files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        ]
    except OSError as exc:
        raise ConfigError(f"cannot read image folder {root}: {exc.strerror or exc}") from exc
    if not files:
        raise ConfigError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class subfolders")
    return files


def read_chunks(
    files: list[tuple[Path, int]], source: ImageSource, chunk_rows: int, image_module: ModuleType
) -> Iterator[Chunk]:
    bad = BadRows(str(source.path), source.skip_bad_rows)
    height, width = source.size
    channels = 3 if source.color == "rgb" else 1
    per_chunk = max(1, min(chunk_rows, CHUNK_BYTES // (4 * channels * height * width)))
    for start in range(0, len(files), per_chunk):
        part = files[start : start + per_chunk]
        images, labels, rows = [], [], []
        for path, label in part:
            image = decode(path, source, image_module, bad)
            if image is not None:
                images.append(image)
                labels.append(label)
                rows.append(_path_number(path.relative_to(source.path)))
        if images:
            yield Chunk(x=np.stack(images), y=np.array(labels, dtype=np.int64), rows=np.array(rows, dtype=np.int64))
    bad.log_summary()


def decode(path: Path, source: ImageSource, image_module: ModuleType, bad: BadRows) -> np.ndarray | None:
    """One image as float32 ``[C, H, W]`` (or ``[H, W, C]``); ``None`` when skipped as bad."""
    height, width = source.size
    try:
        with image_module.open(path) as image:
            converted = image.convert("RGB" if source.color == "rgb" else "L")
            if converted.size != (width, height):
                converted = converted.resize((width, height), image_module.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.float32)
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        bad.report(str(path), f"cannot decode image: {exc}")
        return None
    if source.scale:
        pixels /= 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)) if source.layout == "nchw" else pixels


def _path_number(relative: Path) -> int:
    """A stable non-negative 63-bit number for a file, used to choose its split side."""
    digest = hashlib.blake2b(relative.as_posix().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
