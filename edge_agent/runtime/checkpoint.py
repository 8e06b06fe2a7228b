"""Pausing and resuming a task's training: the checkpoint, its checks and its file.

When a device loses a training condition (charger unplugged, network metered, too hot),
:meth:`OrtTrainer.train <edge_agent.runtime.trainer.OrtTrainer.train>` stops at the next step
boundary and raises :class:`TrainingPaused` carrying a :class:`TrainCheckpoint`: everything needed
to continue exactly where it stopped. Passing it back as ``resume=`` gives a result bit-for-bit
equal to an uninterrupted run. A checkpoint names its task (:class:`TrainPlan`), so it is never
applied to another task, bundle, data size, batch size, epoch count or learning rate
(:class:`CheckpointMismatch`).

File format (version 1): one fedflock tensor set (:mod:`edge_agent.protocol.tensors`), no pickle::

    "@checkpoint"  uint8[n]   UTF-8 JSON: format, version, plan, progress, seed, forward_passes,
                              rng_state, loss_scale, growth_tracker, tensors (state names in order)
    "@order"       int64[N]   the current epoch's permutation (absent at an epoch boundary)
    <name> ...                model and optimizer state tensors, as the manifest names them
    "@sha256"      uint8[32]  sha256 over every tensor before it, in file order: for each one
                              u16 name length, name, dtype name, NUL, u32 ndim, u32 dims, raw
                              little-endian data (all integers little-endian)

The digest makes a torn or bit-flipped file an error instead of a subtly different checkpoint.
:func:`save_checkpoint` replaces the file atomically (a killed process leaves the old file or the
new one); one path has one writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import FedflockError, MalformedMessage, StorageError, TrainingError, UnsupportedVersion
from edge_agent.protocol.tensors import decode_tensors, encode_tensors
from edge_agent.runtime.loss_scale import DynamicLossScaler

Tensors = dict[str, np.ndarray]

FORMAT = "fedflock.train_checkpoint"
VERSION = 1
META, ORDER, DIGEST = "@checkpoint", "@order", "@sha256"


class TrainingPaused(FedflockError):
    """``should_stop`` asked training to stop; :attr:`checkpoint` continues it via ``resume=``."""

    code = "training_paused"

    def __init__(self, checkpoint: TrainCheckpoint) -> None:
        progress, plan = checkpoint.progress, checkpoint.plan
        super().__init__(
            f"training of task {plan.task_id!r} paused after step {progress.steps}; "
            f"it continues with batch {progress.batch + 1} of epoch {progress.epoch + 1}/{plan.epochs}"
        )
        self.checkpoint = checkpoint


class CheckpointMismatch(TrainingError):
    """A checkpoint was offered to a training call for another task, bundle or plan."""

    code = "checkpoint_mismatch"


@dataclass(frozen=True, kw_only=True)
class TrainPlan:
    """What identifies one task's training; a checkpoint resumes only an equal plan."""

    task_id: str
    bundle_digest: str
    num_examples: int
    batch_size: int
    epochs: int
    lr: float


@dataclass(kw_only=True)
class TrainProgress:
    """Where the training loop is (the next step's epoch and batch) and what it has summed."""

    epoch: int = 0
    batch: int = 0
    steps: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    correct_sum: int = 0
    seen: int = 0


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainCheckpoint:
    """Everything needed to continue a task's training exactly (see the module docstring)."""

    plan: TrainPlan
    progress: TrainProgress
    #: model and optimizer state after ``progress.steps`` steps
    tensors: Tensors
    #: the current epoch's permutation; ``None`` at an epoch boundary (not drawn yet)
    order: np.ndarray | None
    #: ``rng.bit_generator.state`` after the task seed and the permutations drawn so far
    rng_state: Mapping[str, Any]
    #: the task's seed base and forward passes run so far (per-pass dropout seeds)
    seed: int
    forward_passes: int
    #: fp16 bundles: the dynamic loss scaler's scale and growth tracker
    loss_scale: float | None = None
    growth_tracker: int = 0


def check_resume(checkpoint: TrainCheckpoint, plan: TrainPlan) -> None:
    """Raise :class:`CheckpointMismatch` unless ``checkpoint`` belongs to ``plan``."""
    differences = [
        f"{f.name} {getattr(checkpoint.plan, f.name)!r} != {getattr(plan, f.name)!r}"
        for f in fields(TrainPlan)
        if getattr(checkpoint.plan, f.name) != getattr(plan, f.name)
    ]
    if differences:
        raise CheckpointMismatch(f"checkpoint belongs to another task (checkpoint vs call): {'; '.join(differences)}")


def restore_rng(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """Put ``rng`` where the paused run left its generator; raises :class:`CheckpointMismatch`."""
    kind = type(rng.bit_generator).__name__
    if state.get("bit_generator") != kind:
        raise CheckpointMismatch(f"checkpoint's generator is {state.get('bit_generator')!r}, rng is {kind}")
    try:
        rng.bit_generator.state = dict(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointMismatch(f"cannot restore the {kind} generator state: {exc}") from exc


def restore_scaler(scaler: DynamicLossScaler | None, checkpoint: TrainCheckpoint) -> DynamicLossScaler | None:
    """``scaler`` with the checkpoint's scale and growth tracker (its config and telemetry stay)."""
    if (scaler is None) != (checkpoint.loss_scale is None):
        raise CheckpointMismatch("checkpoint and trainer disagree on fp16 loss scaling")
    if scaler is None or checkpoint.loss_scale is None:
        return scaler
    return replace(scaler, scale=checkpoint.loss_scale, growth_tracker=checkpoint.growth_tracker)


def save_checkpoint(path: str | os.PathLike[str], checkpoint: TrainCheckpoint) -> None:
    """Write ``checkpoint`` atomically; raises :class:`StorageError` (old file intact) on I/O errors."""
    target = Path(path)
    data = encode_checkpoint(checkpoint)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # full disks often fail here (delayed allocation)
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise StorageError(f"cannot write checkpoint {target}: {exc}") from exc
    _sync_directory(target.parent)


def load_checkpoint(path: str | os.PathLike[str]) -> TrainCheckpoint:
    """Read a checkpoint; raises :class:`StorageError` for a missing, unreadable or corrupt file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read checkpoint {path}: {exc}") from exc
    try:
        return decode_checkpoint(data)
    except StorageError as exc:
        raise StorageError(f"checkpoint {path}: {exc.reason}") from exc


def encode_checkpoint(checkpoint: TrainCheckpoint) -> bytes:
    """The checkpoint file's bytes (see the module docstring)."""
    reserved = sorted({META, ORDER, DIGEST} & set(checkpoint.tensors))
    if reserved:
        raise ValueError(f"state tensor names {reserved} are reserved in checkpoints")
    _check_order(checkpoint.order, checkpoint.progress.batch, checkpoint.plan.num_examples)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "plan": asdict(checkpoint.plan),
        "progress": asdict(checkpoint.progress),
        "seed": checkpoint.seed,
        "forward_passes": checkpoint.forward_passes,
        "rng_state": _to_json(checkpoint.rng_state),
        "loss_scale": checkpoint.loss_scale,
        "growth_tracker": checkpoint.growth_tracker,
        "tensors": list(checkpoint.tensors),
    }
    raw_meta = json.dumps(meta, allow_nan=False, separators=(",", ":")).encode("utf-8")
    tensors: Tensors = {META: np.frombuffer(raw_meta, dtype=np.uint8)}
    if checkpoint.order is not None:
        tensors[ORDER] = np.asarray(checkpoint.order, dtype=np.int64)
    tensors.update(checkpoint.tensors)
    tensors[DIGEST] = np.frombuffer(tensor_digest(tensors), dtype=np.uint8)
    return encode_tensors(tensors)


def decode_checkpoint(data: bytes | bytearray | memoryview) -> TrainCheckpoint:
    """Parse and verify checkpoint bytes; raises :class:`StorageError`, never returns part of one."""
    try:
        tensors = decode_tensors(data)
    except (MalformedMessage, UnsupportedVersion) as exc:
        raise StorageError(f"corrupt checkpoint: {exc.reason}") from exc
    if META not in tensors or DIGEST not in tensors:
        raise StorageError(f"not a checkpoint: no {META!r} or {DIGEST!r} tensor")
    stored = tensors.pop(DIGEST)
    if stored.dtype != np.uint8 or stored.tobytes() != tensor_digest(tensors):
        raise StorageError("corrupt checkpoint: sha256 does not match its contents")
    try:
        meta = json.loads(tensors.pop(META).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"corrupt checkpoint metadata: {exc}") from exc
    try:
        return _from_meta(meta, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"invalid checkpoint metadata: {exc!r}") from exc


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """sha256 of names, dtypes, shapes and little-endian data, in order (see the module docstring)."""
    digest = hashlib.sha256()
    for name, value in tensors.items():
        raw_name = name.encode("utf-8")
        digest.update(struct.pack("<H", len(raw_name)) + raw_name)
        digest.update(value.dtype.name.encode("ascii") + b"\0")
        digest.update(struct.pack(f"<I{value.ndim}I", value.ndim, *value.shape))
        digest.update(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes())
    return digest.digest()


def _from_meta(meta: Any, tensors: Tensors) -> TrainCheckpoint:
    """Build a checkpoint from verified metadata; raises KeyError/TypeError/ValueError if malformed."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT!r}")
    if meta["version"] != VERSION:
        raise StorageError(f"unsupported checkpoint version {meta['version']!r} (this code reads {VERSION})")
    order = tensors.pop(ORDER, None)
    names = meta["tensors"]
    if not isinstance(names, list) or names != list(tensors):
        raise ValueError(f"state tensors {list(tensors)[:5]} do not match the listed {names!r:.200}")
    plan = TrainPlan(**meta["plan"])
    progress = TrainProgress(**meta["progress"])
    _check_types(plan, progress)
    _check_order(order, progress.batch, plan.num_examples)
    loss_scale = meta["loss_scale"]
    return TrainCheckpoint(
        plan=plan,
        progress=progress,
        tensors={name: np.array(value) for name, value in tensors.items()},
        order=None if order is None else np.array(order),
        rng_state=_from_json(meta["rng_state"]),
        seed=_integer(meta["seed"]),
        forward_passes=_integer(meta["forward_passes"]),
        loss_scale=None if loss_scale is None else float(loss_scale),
        growth_tracker=_integer(meta["growth_tracker"]),
    )


def _check_types(plan: TrainPlan, progress: TrainProgress) -> None:
    if not isinstance(plan.task_id, str) or not isinstance(plan.bundle_digest, str):
        raise TypeError("task_id and bundle_digest must be strings")
    for name in ("num_examples", "batch_size", "epochs"):
        _integer(getattr(plan, name))
    for name in ("epoch", "batch", "steps", "skipped", "correct_sum", "seen"):
        _integer(getattr(progress, name))
    if not isinstance(plan.lr, (int, float)) or not isinstance(progress.loss_sum, (int, float)):
        raise TypeError("lr and loss_sum must be numbers")


def _check_order(order: np.ndarray | None, batch: int, num_examples: int) -> None:
    """An epoch's permutation exists exactly inside the epoch (it is drawn by the epoch's first step)."""
    if (order is None) != (batch == 0) or (order is not None and order.shape != (num_examples,)):
        shape = None if order is None else list(order.shape)
        raise ValueError(f"epoch order {shape} at batch {batch} of a {num_examples}-example task")


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _to_json(value: Any) -> Any:
    """Generator states are JSON except for a few numpy arrays (MT19937's key, Philox's counter)."""
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ndarray", "dtype"}:
            return np.array(value["ndarray"], dtype=np.dtype(value["dtype"]))
        return {key: _from_json(item) for key, item in value.items()}
    return value


def _discard(tmp: Path) -> None:
    """Remove a half-written temporary file; the write error being raised matters more than this one."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # e.g. a read-only remount after I/O errors: the next save overwrites it anyway
        return


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); directories cannot be opened on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise StorageError(f"cannot open {directory} to sync the checkpoint: {exc}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"cannot sync {directory} after writing the checkpoint: {exc}") from exc
    finally:
        os.close(fd)
