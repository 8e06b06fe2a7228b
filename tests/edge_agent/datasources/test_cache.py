"""The streaming cache: single-pass .npy files, reuse, rebuild, atomic publication."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.datasources.cache import Chunk, NpyAppender, cached_split
from edge_agent.datasources.split import DataSplit
from edge_agent.errors import ConfigError


def test_an_appended_npy_file_reads_back_with_the_final_row_count(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    appender = NpyAppender(path)
    parts = [np.full((n, 3, 2), n, dtype=np.float32) for n in (5, 1, 700)]
    for part in parts:
        appender.append(part)
    appender.finish((3, 2), np.dtype(np.float32))
    loaded = np.load(path, mmap_mode="r")
    assert isinstance(loaded, np.memmap)
    assert np.array_equal(loaded, np.concatenate(parts))


def test_an_empty_npy_file_takes_the_given_shape(tmp_path: Path) -> None:
    appender = NpyAppender(tmp_path / "e.npy")
    appender.finish((4,), np.dtype(np.int64))
    loaded = np.load(tmp_path / "e.npy", mmap_mode="r")
    assert loaded.shape == (0, 4) and loaded.dtype == np.int64


def test_a_chunk_of_another_shape_is_refused(tmp_path: Path) -> None:
    appender = NpyAppender(tmp_path / "a.npy")
    appender.append(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        appender.append(np.zeros((2, 4), np.float32))
    appender.close()


class Source:
    """Counts how often the cache asks for the data."""

    def __init__(self, n: int, *, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.builds = n, fail_at, 0

    def chunks(self) -> Iterator[Chunk]:
        self.builds += 1
        for start in range(0, self.n, 10):
            if self.fail_at is not None and start >= self.fail_at:
                raise ConfigError("bad row")
            rows = np.arange(start, min(start + 10, self.n))
            yield Chunk(x=rows[:, None].astype(np.float32) * [1, -1], y=rows, rows=rows)


def _split(cache: Path, source: Source, content: str = "v1", fraction: float = 0.25) -> DataSplit:
    return cached_split(
        cache, identity=["t"], content=[content], chunks=source.chunks, fraction=fraction, seed=0, source="test"
    )


def test_rows_are_split_into_memory_mapped_parts_and_the_cache_is_reused(tmp_path: Path) -> None:
    source = Source(95)
    split = _split(tmp_path, source)
    assert split.validation is not None and isinstance(split.train.x, np.memmap)
    assert 0 < len(split.validation) < len(split.train)
    assert np.array_equal(np.sort(np.concatenate([split.train.y, split.validation.y])), np.arange(95))
    assert np.array_equal(split.train.x[:, 1], -split.train.y.astype(np.float32))
    again = _split(tmp_path, source)
    assert source.builds == 1
    assert again.validation is not None and np.array_equal(again.validation.y, split.validation.y)


def test_a_changed_source_is_rebuilt_and_the_old_entry_removed(tmp_path: Path) -> None:
    _split(tmp_path, Source(30), content="v1")
    (old,) = os.listdir(tmp_path)
    source = Source(40)
    assert len(_split(tmp_path, source, content="v2").train) > 0
    (new,) = os.listdir(tmp_path)
    assert source.builds == 1 and new != old and new.split(".")[0] == old.split(".")[0]


def test_a_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    _split(tmp_path, Source(30))
    (entry,) = tmp_path.iterdir()
    (entry / "train_x.npy").write_bytes(b"not numpy")
    source = Source(30)
    assert len(_split(tmp_path, source).train) > 0 and source.builds == 1


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad row"):
        _split(tmp_path, Source(100, fail_at=50))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("n", "fraction", "message"), [(0, 0.1, "no data rows"), (1, 0.9999, "leaves none")])
def test_empty_data_or_an_empty_train_part_is_a_config_error(
    tmp_path: Path, n: int, fraction: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _split(tmp_path, Source(n), fraction=fraction)
    assert os.listdir(tmp_path) == []


def test_an_entry_published_concurrently_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def rename_after_a_rival(src: str, dst: str) -> None:
        shutil.copytree(src, dst)  # a rival's identical entry lands first ...
        real_rename(src, dst)  # ... so ours fails: the target exists and is not empty

    monkeypatch.setattr(os, "rename", rename_after_a_rival)
    split = _split(tmp_path, Source(20))
    assert len(split.train) + len(split.validation or ()) == 20
    assert len(os.listdir(tmp_path)) == 1


def test_a_temporary_folder_of_a_dead_build_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    _split(tmp_path, Source(10), content="v1")
    (entry,) = tmp_path.iterdir()
    slot = entry.name.split(".")[0]
    dead = tmp_path / f".tmp-{slot}.0123-999999999-abcd1234"  # above Linux's pid_max
    live = tmp_path / f".tmp-{slot}.0123-{os.getpid()}-abcd1234"
    dead.mkdir()
    live.mkdir()
    _split(tmp_path, Source(10), content="v2")
    assert not dead.exists() and live.exists()
