"""Image folders: one subfolder per class, decoded with Pillow into NCHW float32."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edge_agent.datasources import DataSplit, open_data, parse_data_config
from edge_agent.errors import ConfigError


def _png(path: Path, color: tuple[int, int, int] | int, size: tuple[int, int] = (6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB" if isinstance(color, tuple) else "L", size, color).save(path)


def _open(root: Path, **table: Any) -> DataSplit:
    config = parse_data_config({"kind": "images", "path": str(root), "size": [2, 3]} | table)
    return open_data(config, cache_dir=root.parent / "cache")


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for i in range(3):
        _png(root / "dog" / f"d{i}.png", (0, 51, 102))
        _png(root / "cat" / f"c{i}.png", (255, 0, 0))
    _png(root / "dog" / "puppies" / "p.png", (0, 51, 102))  # nested folders count
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    return root


def test_classes_are_the_sorted_subfolders_and_images_become_nchw_in_0_1(pets: Path) -> None:
    train = _open(pets).train
    assert isinstance(train.x, np.memmap)
    assert train.x.shape == (7, 3, 2, 3) and train.x.dtype == np.float32
    np.testing.assert_array_equal(train.y, [0, 0, 0, 1, 1, 1, 1])  # cat, then dog
    np.testing.assert_allclose(train.x[0, :, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(train.x[-1], np.broadcast_to(np.array([0, 0.2, 0.4])[:, None, None], (3, 2, 3)))


def test_explicit_classes_set_the_order_and_leave_other_folders_out(pets: Path) -> None:
    _png(pets / "bird" / "b.png", (1, 2, 3))
    train = _open(pets, classes=["dog", "cat"]).train
    np.testing.assert_array_equal(train.y, [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(train.x[0, :, 0, 0], [0, 0.2, 0.4])


def test_grayscale_channels_last_unscaled(tmp_path: Path) -> None:
    _png(tmp_path / "g" / "a" / "x.png", 200, size=(3, 2))
    train = _open(tmp_path / "g", color="grayscale", layout="nhwc", scale=False).train
    assert train.x.shape == (1, 2, 3, 1)
    np.testing.assert_array_equal(train.x, np.full((1, 2, 3, 1), 200.0))


def test_a_split_keeps_every_image_on_its_side_when_images_are_added(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    for i in range(40):
        _png(root / "a" / f"{i:02d}.png", (i, i, i))
    first = _open(root, val_fraction=0.3, seed=2)
    assert first.validation is not None and 0 < len(first.validation) < 40
    held = set(first.validation.x[:, 0, 0, 0].round(5))
    for i in range(40, 60):
        _png(root / "a" / f"{i:02d}.png", (i, i, i))
    second = _open(root, val_fraction=0.3, seed=2)
    assert second.validation is not None and len(first.train) + len(first.validation) == 40
    assert len(second.train) + len(second.validation) == 60
    assert held <= set(second.validation.x[:, 0, 0, 0].round(5))
    assert not held & set(second.train.x[:, 0, 0, 0].round(5))


def test_an_undecodable_image_is_an_error_naming_the_file_or_skipped(
    pets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (pets / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match=r"cat/broken.png: cannot decode image"):
        _open(pets)
    with caplog.at_level(logging.WARNING, logger="fedflock.data"):
        assert len(_open(pets, skip_bad_rows=True).train) == 7
    assert "skipped 1 bad rows" in caplog.text


@pytest.mark.parametrize(
    ("table", "message"),
    [({"classes": ["cat", "cow"]}, "no folder for class 'cow'"), ({"classes": ["empty"]}, "no images")],
)
def test_missing_classes_or_images_are_config_errors(pets: Path, table: dict[str, Any], message: str) -> None:
    (pets / "empty").mkdir()
    with pytest.raises(ConfigError, match=message):
        _open(pets, **table)


def test_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read image folder"):
        _open(tmp_path / "nowhere")


def test_without_pillow_image_folders_say_how_to_get_it(pets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(ConfigError, match="image folders need Pillow: pip install pillow"):
        _open(pets)


def test_the_data_package_imports_neither_pillow_nor_torch() -> None:
    code = "import sys, edge_agent.datasources; print(sorted({'PIL', 'torch'} & set(sys.modules)))"
    repo = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
