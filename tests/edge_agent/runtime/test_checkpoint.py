"""The checkpoint file: round trip, atomic replacement, full disks, and corrupt or foreign files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import StorageError
from edge_agent.protocol.tensors import decode_tensors, encode_tensors, write_tensor_file
from edge_agent.runtime import checkpoint as ckpt
from edge_agent.runtime.checkpoint import (
    TrainCheckpoint,
    TrainPlan,
    TrainProgress,
    decode_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def make_checkpoint(*, steps: int = 7, fp16: bool = True, rng: Any = None) -> TrainCheckpoint:
    """3 batches per epoch: at an epoch boundary (steps % 3 == 0) there is no order yet."""
    rng = rng if rng is not None else np.random.default_rng(3)
    rng.permutation(10)
    return TrainCheckpoint(
        plan=TrainPlan(task_id="t-1", bundle_digest="ab" * 32, num_examples=10, batch_size=4, epochs=3, lr=0.05),
        progress=TrainProgress(
            epoch=steps // 3, batch=steps % 3, steps=steps, skipped=1, loss_sum=1 / 3, correct_sum=9, seen=24
        ),
        tensors={
            "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
            "bn.num_batches_tracked": np.array(5, dtype=np.int64),
            "momentum.conv.weight": np.full((2, 3, 4), -0.1, dtype=np.float32),
            "half": np.array([1.5, -2.25], dtype=np.float16),
        },
        order=np.random.default_rng(1).permutation(10) if steps % 3 else None,
        rng_state=rng.bit_generator.state,
        seed=2**62 - 5,
        forward_passes=11,
        loss_scale=2.0**15 if fp16 else None,
        growth_tracker=3 if fp16 else 0,
    )


def assert_same(got: TrainCheckpoint, want: TrainCheckpoint) -> None:
    assert (got.plan, got.progress) == (want.plan, want.progress)
    assert list(got.tensors) == list(want.tensors)
    for name, value in want.tensors.items():
        assert got.tensors[name].dtype == value.dtype and np.array_equal(got.tensors[name], value), name
    assert (got.order is None) == (want.order is None)
    assert got.order is None or np.array_equal(got.order, want.order)  # type: ignore[arg-type]
    assert (got.seed, got.forward_passes) == (want.seed, want.forward_passes)
    assert (got.loss_scale, got.growth_tracker) == (want.loss_scale, want.growth_tracker)
    restored, original = np.random.default_rng(0), np.random.default_rng(0)
    original.bit_generator.state = dict(want.rng_state)
    ckpt.restore_rng(restored, got.rng_state)
    assert np.array_equal(restored.random(8), original.random(8))


@pytest.mark.parametrize(
    "checkpoint",
    [make_checkpoint(), make_checkpoint(steps=6, fp16=False)],
    ids=["mid-epoch-fp16", "epoch-boundary-fp32"],
)
def test_round_trip_through_a_file(tmp_path: Path, checkpoint: TrainCheckpoint) -> None:
    path = tmp_path / "task.ckpt"
    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)
    assert_same(loaded, checkpoint)
    assert loaded.tensors["conv.weight"].flags.writeable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.ckpt"]  # no temporary file left


def test_generator_states_holding_arrays_round_trip() -> None:
    mt = np.random.Generator(np.random.MT19937(5))
    checkpoint = make_checkpoint(rng=mt)
    loaded = decode_checkpoint(encode_checkpoint(checkpoint))
    restored = np.random.Generator(np.random.MT19937(0))
    ckpt.restore_rng(restored, loaded.rng_state)
    assert np.array_equal(restored.random(8), mt.random(8))


def test_file_is_a_plain_tensor_set_with_json_metadata(tmp_path: Path) -> None:
    tensors = decode_tensors(encode_checkpoint(make_checkpoint()))
    assert list(tensors) == [
        "@checkpoint",
        "@order",
        "conv.weight",
        "bn.num_batches_tracked",
        "momentum.conv.weight",
        "half",
        "@sha256",
    ]
    meta = json.loads(tensors["@checkpoint"].tobytes())
    assert (meta["format"], meta["version"]) == ("fedflock.train_checkpoint", 1)
    assert meta["progress"]["steps"] == 7 and meta["rng_state"]["bit_generator"] == "PCG64"


def test_saving_replaces_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "task.ckpt"
    save_checkpoint(path, make_checkpoint(steps=4))
    save_checkpoint(path, make_checkpoint(steps=8))
    assert load_checkpoint(path).progress.steps == 8


def test_full_disk_raises_storage_error_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "task.ckpt"
    save_checkpoint(path, make_checkpoint(steps=4))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(StorageError, match="No space left"):
        save_checkpoint(path, make_checkpoint(steps=8))
    monkeypatch.undo()
    assert load_checkpoint(path).progress.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.ckpt"]  # the partial file is gone


def test_a_write_killed_before_the_rename_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "task.ckpt"
    save_checkpoint(path, make_checkpoint(steps=4))
    partial = encode_checkpoint(make_checkpoint(steps=8))
    (tmp_path / ".task.ckpt.tmp").write_bytes(partial[: len(partial) // 2])  # what a killed writer leaves
    assert load_checkpoint(path).progress.steps == 4
    save_checkpoint(path, make_checkpoint(steps=8))
    assert load_checkpoint(path).progress.steps == 8


def test_every_truncation_is_an_error() -> None:
    data = encode_checkpoint(make_checkpoint())
    for size in range(len(data)):
        with pytest.raises(StorageError):
            decode_checkpoint(data[:size])


def test_every_bit_flip_is_an_error_or_harmless() -> None:
    """Flipped bits in padding or reserved bytes change nothing; anywhere else they are caught."""
    original = make_checkpoint()
    data = encode_checkpoint(original)
    errors = 0
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        try:
            loaded = decode_checkpoint(bytes(flipped))
        except StorageError:
            errors += 1
            continue
        assert_same(loaded, original)
    assert errors > len(data) * 0.8


def test_missing_file_and_plain_tensor_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "absent.ckpt")
    write_tensor_file(tmp_path / "weights.bin", {"w": np.zeros(3, np.float32)})
    with pytest.raises(StorageError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "weights.bin")
    (tmp_path / "junk.ckpt").write_bytes(b"hello")
    with pytest.raises(StorageError, match=r"junk\.ckpt.*corrupt"):
        load_checkpoint(tmp_path / "junk.ckpt")


def _digest(tensors: dict[str, np.ndarray]) -> bytes:
    """The file digest as the module docstring specifies it (written independently here)."""
    h = hashlib.sha256()
    for name, value in tensors.items():
        h.update(struct.pack("<H", len(name)) + name.encode() + value.dtype.name.encode() + b"\0")
        h.update(
            struct.pack(f"<I{value.ndim}I", value.ndim, *value.shape)
            + value.astype(value.dtype.newbyteorder("<")).tobytes()
        )
    return h.digest()


def _rewrite_meta(data: bytes, **changes: Any) -> bytes:
    tensors = dict(decode_tensors(data))
    del tensors["@sha256"]
    meta = json.loads(tensors["@checkpoint"].tobytes()) | changes
    tensors["@checkpoint"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tensors["@sha256"] = np.frombuffer(_digest(tensors), dtype=np.uint8)
    return encode_tensors(tensors)


def test_digest_follows_the_documented_layout() -> None:
    data = encode_checkpoint(make_checkpoint())
    assert decode_checkpoint(_rewrite_meta(data)).progress.steps == 7


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 2}, "unsupported checkpoint version 2"),
        ({"format": "something.else"}, "format"),
        ({"tensors": ["conv.weight"]}, "do not match"),
        ({"progress": {"steps": -1}}, "invalid checkpoint metadata"),
        ({"seed": "7"}, "non-negative integer"),
    ],
)
def test_foreign_or_inconsistent_metadata_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(StorageError, match=message):
        decode_checkpoint(_rewrite_meta(encode_checkpoint(make_checkpoint()), **changes))


def test_inconsistent_checkpoints_cannot_be_saved() -> None:
    checkpoint = make_checkpoint()
    with pytest.raises(ValueError, match="reserved"):
        encode_checkpoint(replace(checkpoint, tensors={"@order": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="epoch order"):
        encode_checkpoint(replace(checkpoint, order=None))
    with pytest.raises(ValueError, match="epoch order"):
        encode_checkpoint(replace(checkpoint, order=np.arange(9)))
