"""One task's work on the device: train with onnxruntime, encode the delta, build the UPDATE.

No I/O beyond the device's own state files (personal tensors, codec residual); the agent decides
when to run it (eligibility) and what to do with the result (store, upload). The UPDATE is bound
to its TASK (:mod:`edge_agent.protocol.binding`): it echoes the TASK's nonce and carries the
sha256 of the payload it trained from; both live in the stored envelope, so a re-send after a
restart carries them unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np

from edge_agent.codecs import (
    CodecSpec,
    ErrorFeedback,
    buffer_codec,
    choose_codec,
    encode_update,
    load_residual,
    save_residual,
)
from edge_agent.data import Dataset
from edge_agent.errors import FedflockError, ProtocolError, StorageError
from edge_agent.privacy import LocalDP
from edge_agent.protocol.binding import payload_digest
from edge_agent.protocol.messages import ErrorMessage, TaskMessage, UpdateMessage
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import check_tensors
from edge_agent.runtime.checkpoint import (
    CheckpointMismatch,
    TrainCheckpoint,
    TrainingPaused,
    load_checkpoint,
    save_checkpoint,
)
from edge_agent.runtime.personal import PersonalStore
from edge_agent.runtime.trainer import OrtTrainer, StepCallback

log = logging.getLogger("fedflock.agent")

#: task ids used as checkpoint file names as they are (others are hashed): no dots, no separators
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TaskRunner:
    """Runs tasks for one device: its trainer, data, personal tensors and codec residual."""

    def __init__(
        self,
        trainer: OrtTrainer,
        data: Dataset,
        *,
        rng: np.random.Generator,
        clock: Callable[[], float],
        state_dir: Path | None,
        codec_preferences: Mapping[str, tuple[str, ...]],
        error_feedback: bool,
        validation: Dataset | None = None,
        local_dp: LocalDP | None = None,
    ) -> None:
        self.trainer = trainer
        self.data = data
        #: held-out local examples for the ``local_eval_*`` metrics (the training data without one)
        self.validation = validation if validation is not None and len(validation) else None
        self._rng = rng
        self._clock = clock
        self._preferences = codec_preferences
        self._error_feedback = error_feedback
        self.personal = PersonalStore(trainer.bundle, state_dir)
        digest = trainer.bundle.digest[:16]
        self._residual_path = state_dir / f"residual-{digest}.ffts" if state_dir is not None else None
        self._feedback: ErrorFeedback | None = None
        #: local DP: clip + noise every delta before the codec and error feedback (None: off)
        self.local_dp = local_dp

    def execute(
        self,
        task: TaskMessage,
        *,
        network: str = "unknown",
        should_stop: Callable[[], bool] | None = None,
        resume: TrainCheckpoint | None = None,
        on_step: StepCallback | None = None,
        batch_size: int | None = None,
    ) -> UpdateMessage | ErrorMessage:
        """Train for ``task``; failures become an ERROR message, not a crash.

        :class:`TrainingPaused` (``should_stop`` said so at a step boundary) is raised, not turned
        into an ERROR: the caller checkpoints and resumes later. ``batch_size`` overrides the
        task's (the agent lowers it to fit free memory). A ``resume`` checkpoint the trainer
        refuses (another batch size, say, because free memory shrank) is dropped with a log line
        and training starts over: the task is still worth doing.
        """
        try:
            return self._train(
                task, network=network, should_stop=should_stop, resume=resume, on_step=on_step, batch_size=batch_size
            )
        except TrainingPaused:
            raise
        except FedflockError as exc:
            if isinstance(exc, CheckpointMismatch) and resume is not None:
                log.warning("%s: task %s starts over: %s", task.device_id, task.task_id, exc)
                return self.execute(
                    task, network=network, should_stop=should_stop, on_step=on_step, batch_size=batch_size
                )
            log.error("%s: task %s failed (%s): %s", task.device_id, task.task_id, exc.code, exc)
            return ErrorMessage(
                device_id=task.device_id, round=task.round, task_id=task.task_id, code=exc.code, reason=exc.reason
            )

    def _train(
        self,
        task: TaskMessage,
        *,
        network: str,
        should_stop: Callable[[], bool] | None,
        resume: TrainCheckpoint | None,
        on_step: StepCallback | None,
        batch_size: int | None,
    ) -> UpdateMessage:
        bundle = self.trainer.bundle
        if task.bundle_digest != bundle.digest:
            raise ProtocolError(f"task wants bundle {task.bundle_digest[:12]}…, device has {bundle.digest[:12]}…")
        started = self._clock()
        # Personal tensors come from the device's own copy; a server that sends them is ignored.
        shared = {t.name: task.weights[t.name] for t in bundle.manifest.shared_model_tensors if t.name in task.weights}
        check_tensors(bundle.manifest, shared, names=[t.name for t in bundle.manifest.shared_model_tensors])
        weights = shared | self.personal.load()
        used_batch = batch_size or task.batch_size
        result = self.trainer.train(
            weights,
            self.data.x,
            self.data.y,
            epochs=task.epochs,
            batch_size=used_batch,
            lr=task.lr,
            rng=self._rng,
            hyperparameters=task.hyperparameters,
            frozen=task.frozen,
            task_id=task.task_id,
            should_stop=should_stop,
            resume=resume,
            on_step=on_step,
        )
        held_out = self.validation or self.data
        evaluation = self.trainer.evaluate(result.weights, held_out.x, held_out.y)
        self.personal.save(result.weights)
        aggregated = [t.name for t in bundle.manifest.aggregated_tensors]
        delta = {name: (result.weights[name] - task.weights[name]).astype(np.float32) for name in aggregated}
        if self.local_dp is not None:  # before the codec: its rounding and residual are post-processing
            delta = self.local_dp.privatize(delta)
        spec = choose_codec(task.codecs, self._preferences, network)
        payload = self._encode(delta, spec)
        seconds = self._clock() - started
        log.info(
            "%s: round %d trained %d examples in %.2fs, loss %.4f; update %d bytes as %s",
            task.device_id,
            task.round,
            result.num_examples,
            seconds,
            result.loss,
            len(payload),
            spec,
        )
        metrics = {
            "train_loss": result.loss,
            # accuracy is NaN (and left out) for regression bundles
            "train_accuracy": result.accuracy if bundle.manifest.accuracy_defined else math.nan,
            "local_eval_loss": evaluation.loss,
            "local_eval_accuracy": evaluation.accuracy,
            "train_seconds": seconds,
        }
        if self.local_dp is not None:
            metrics["local_dp_epsilon"] = self.local_dp.epsilon(1)
        if used_batch != task.batch_size:
            metrics["batch_size"] = float(used_batch)
        if result.loss_scale is not None:  # fp16 bundles: overflowed (skipped) steps and the loss scale
            metrics |= {"skipped_steps": float(result.skipped_steps), "loss_scale": result.loss_scale}
        return UpdateMessage(
            device_id=task.device_id,
            round=task.round,
            task_id=task.task_id,
            model_version=task.model_version,
            num_examples=result.num_examples,
            metrics={key: value for key, value in metrics.items() if math.isfinite(value)},
            codec=str(spec),
            nonce=task.nonce,
            base_digest=task.weights_digest or payload_digest(encode_tensors(task.weights)),
            payload=payload,
        )

    def _encode(self, delta: dict[str, np.ndarray], spec: CodecSpec) -> bytes:
        """Encode with error feedback: the residual is reloaded after a restart and saved atomically.

        Tensors are referenced by position in the manifest's aggregated list (no names on the
        wire); running statistics use :func:`buffer_codec` and get no feedback.
        """
        manifest = self.trainer.bundle.manifest
        order = [t.name for t in manifest.aggregated_tensors]
        buffers = [t.name for t in manifest.aggregated_tensors if t.role == "buffer"]
        overrides = dict.fromkeys(buffers, buffer_codec(spec))
        if not self._error_feedback:
            return encode_update(delta, spec, rng=self._rng, overrides=overrides, order=order)
        if self._feedback is None:
            residual = load_residual(self._residual_path) if self._residual_path is not None else {}
            shapes = {name: value.shape for name, value in delta.items() if name not in buffers}
            if {n: v.shape for n, v in residual.items()} != shapes:
                residual = {}  # another model's residual (or none): start clean
            self._feedback = ErrorFeedback(residual)
        payload = self._feedback.compress(
            delta, spec, rng=self._rng, overrides=overrides, order=order, without_feedback=buffers
        )
        if self._residual_path is not None:
            self._residual_path.parent.mkdir(parents=True, exist_ok=True)
            save_residual(self._residual_path, self._feedback.residual)
        return payload


class CheckpointShelf:
    """Paused tasks' training checkpoints, one file per task under ``directory`` (or in memory).

    A checkpoint that cannot be read (corrupt, written by another bundle) is discarded with a log
    line and the task starts over: losing progress is better than training from a wrong state.
    Task ids come from the server, so a file is named by its task id only when that is a safe
    file name (as the server's ids are), else ``sha256.<hex of the id>.ckpt``: no task id can
    address a file outside ``directory``.
    """

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._memory: dict[str, TrainCheckpoint] = {}

    def _path(self, task_id: str) -> Path | None:
        if self._directory is None:
            return None
        if _SAFE_FILE_NAME.fullmatch(task_id):
            return self._directory / f"{task_id}.ckpt"
        return self._directory / f"sha256.{hashlib.sha256(task_id.encode('utf-8', 'surrogatepass')).hexdigest()}.ckpt"

    def save(self, task_id: str, checkpoint: TrainCheckpoint) -> None:
        path = self._path(task_id)
        if path is None:
            self._memory[task_id] = checkpoint
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, checkpoint)

    def load(self, task_id: str) -> TrainCheckpoint | None:
        path = self._path(task_id)
        if path is None:
            return self._memory.get(task_id)
        if not path.exists():
            return None
        try:
            return load_checkpoint(path)
        except StorageError as exc:
            log.warning("discarded unreadable checkpoint of task %s (training starts over): %s", task_id, exc)
            path.unlink(missing_ok=True)
            return None

    def resume(self, task_id: str, batch_size: int) -> tuple[TrainCheckpoint | None, int]:
        """The task's checkpoint (if any) and the batch size to train with: the paused run's when
        it is at most ``batch_size`` (what fits now), so the result stays that of an uninterrupted
        run. A larger one no longer fits; the trainer then refuses the checkpoint and
        :meth:`TaskRunner.execute` starts over."""
        checkpoint = self.load(task_id)
        if checkpoint is not None and checkpoint.plan.batch_size <= batch_size:
            return checkpoint, checkpoint.plan.batch_size
        return checkpoint, batch_size

    def discard(self, task_id: str) -> None:
        self._memory.pop(task_id, None)
        path = self._path(task_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def prune(self, pending: Collection[str]) -> None:
        """Discard the checkpoints of tasks not in ``pending`` (the inbox's live tasks), logging each.

        Such a task left the inbox while it was paused: its deadline passed (the store expires a
        task without knowing about its checkpoint), or the store lost it. Nothing resumes it.
        """
        gone = [task_id for task_id in self._memory if task_id not in pending]
        for task_id in gone:
            del self._memory[task_id]
        if self._directory is not None and self._directory.is_dir():
            keep = {self._path(task_id) for task_id in pending}
            for path in sorted(self._directory.glob("*.ckpt")):
                if path not in keep:
                    gone.append(_task_of(path))
                    path.unlink(missing_ok=True)
        for task_id in gone:
            log.warning("abandoned task %s: its deadline passed while it was paused", task_id)


def _task_of(path: Path) -> str:
    """The task id of a checkpoint file (read from the file when the name is a hash)."""
    if not path.stem.startswith("sha256."):
        return path.stem
    try:
        return load_checkpoint(path).plan.task_id
    except StorageError:
        return path.name
