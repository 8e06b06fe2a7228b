"""On-device training and evaluation with plain onnxruntime.

The train-step graph is a pure function ``(x, y, lr, ..., tensors) -> (loss, correct, new tensors)``;
this module feeds it mini-batches and threads the tensors from one step into the next. Per task
it also feeds the hyper-parameters (task values over manifest defaults), the FedProx global
weights (the weights the task started from), the trainable masks, a step counter (1-based,
continuing across epochs, for Adam's bias correction and on-device schedules) and a per-step
seed. With micro-batching, each batch runs through ``accumulate`` once per micro-batch and
``apply`` once (:mod:`model_export.accumulation` explains why that equals one big step).
Training can pause at any step boundary and resume bit for bit (:mod:`edge_agent.runtime.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.errors import BundleError, NonFiniteLoss, TrainingError
from edge_agent.protocol.manifest import FINITE_OUTPUT, LOSS_SCALE_INPUT
from edge_agent.runtime.bundle import Bundle, Tensors, check_tensors
from edge_agent.runtime.checkpoint import (
    CheckpointMismatch,
    TrainCheckpoint,
    TrainingPaused,
    TrainPlan,
    TrainProgress,
    check_resume,
    restore_rng,
    restore_scaler,
)
from edge_agent.runtime.feeds import (
    GraphRunner,
    HyperValue,
    accumulation_scales,
    mask_values,
    micro_slices,
    resolve_hyperparameters,
)
from edge_agent.runtime.loss_scale import DynamicLossScaler
from edge_agent.runtime.train_loop import StepContext, TrainRun, batch_slices, total_steps

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["EvalResult", "OrtTrainer", "StepCallback", "StopCheck", "TrainResult", "batch_slices"]

#: Called after every step with (steps done, total steps, running mean loss).
StepCallback = Callable[[int, int, float], None]
#: Asked at every step boundary: True pauses training (:class:`TrainingPaused`).
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class TrainResult:
    weights: Tensors
    num_examples: int
    steps: int
    loss: float
    accuracy: float
    #: fp16 bundles: steps whose gradients overflowed and were not applied (not in loss/accuracy)
    skipped_steps: int = 0
    #: fp16 bundles: the dynamic loss scale after the last step
    loss_scale: float | None = None


@dataclass(frozen=True)
class Sessions:
    """A trainer's onnxruntime sessions (micro-batching adds ``accumulate`` and ``apply``)."""

    train: GraphRunner
    infer: ort.InferenceSession
    accumulate: GraphRunner | None = None
    apply: GraphRunner | None = None


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


class OrtTrainer:
    """Trains and evaluates one bundle's model. Create with :meth:`open`.

    ``micro_batch`` (default: the manifest's) splits every batch into micro-batches of at most
    that size through the bundle's ``accumulate``/``apply`` graphs; 0 turns that off.

    fp16 bundles (``manifest.precision``) get a :class:`DynamicLossScaler` (default: GradScaler's
    settings; inject one to change them). It lives as long as the trainer, so the scale found in
    one task carries over to the next; a step whose gradients are not finite is skipped.
    """

    def __init__(
        self,
        bundle: Bundle,
        open_sessions: Callable[[], Sessions],
        *,
        micro_batch: int = 0,
        loss_scaler: DynamicLossScaler | None = None,
    ) -> None:
        self.bundle = bundle
        self._open_sessions = open_sessions
        self._sessions: Sessions | None = None
        manifest = bundle.manifest
        self._infer_spec = manifest.graphs["inference"]
        self._model_names = [t.name for t in manifest.model_tensors]
        self._state_names = [t.name for t in manifest.tensors]
        self.micro_batch = micro_batch or 0
        self.loss_scaler: DynamicLossScaler | None = None
        if manifest.precision == "fp16":
            self.loss_scaler = loss_scaler or DynamicLossScaler.initial()

    @classmethod
    def open(
        cls,
        bundle: Bundle,
        *,
        threads: int = 1,
        micro_batch: int | None = None,
        loss_scaler: DynamicLossScaler | None = None,
        lazy: bool = False,
    ) -> OrtTrainer:
        """A trainer for ``bundle``. ``lazy`` creates the onnxruntime sessions (and imports
        onnxruntime) at the first train/evaluate call instead of now: an idle agent then holds
        ~30 MB less (benchmarks/agent.py), at the price of finding a broken graph file only then."""
        manifest = bundle.manifest
        size = manifest.micro_batch if micro_batch is None else micro_batch
        if size and "accumulate" not in manifest.graphs:
            raise BundleError("micro-batching needs a bundle exported with micro_batch (no accumulate graph)")

        def open_sessions() -> Sessions:
            graphs = manifest.graphs
            accumulate = apply = None
            if size:
                accumulate = GraphRunner(bundle.session("accumulate", threads=threads), graphs["accumulate"])
                apply = GraphRunner(bundle.session("apply", threads=threads), graphs["apply"])
            train = GraphRunner(bundle.session("train_step", threads=threads), graphs["train_step"])
            return Sessions(train, bundle.session("inference", threads=threads), accumulate, apply)

        trainer = cls(bundle, open_sessions, micro_batch=size or 0, loss_scaler=loss_scaler)
        if not lazy:
            trainer.load()
        return trainer

    def load(self) -> None:
        """Create the onnxruntime sessions now (a lazy trainer does it at its first use)."""
        self._runners()

    def _runners(self) -> Sessions:
        if self._sessions is None:
            self._sessions = self._open_sessions()
        return self._sessions

    def train(
        self,
        weights: Tensors,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
        on_step: StepCallback | None = None,
        hyperparameters: Mapping[str, HyperValue] | None = None,
        frozen: Sequence[str] = (),
        global_weights: Tensors | None = None,
        task_id: str = "",
        should_stop: StopCheck | None = None,
        resume: TrainCheckpoint | None = None,
    ) -> TrainResult:
        """Run ``epochs`` passes of mini-batch training from ``weights``; optimizer state starts at zero.

        ``hyperparameters`` override the manifest defaults, ``frozen`` names tensors whose mask is
        0 for this task, ``global_weights`` (default ``weights``) is the FedProx anchor.
        Raises :class:`ContractViolation` for unknown hyper-parameters or frozen names.

        ``should_stop`` is asked after every step but the last; when it returns True, training
        raises :class:`TrainingPaused` whose ``checkpoint`` (tagged with ``task_id`` and the
        bundle digest) continues it: call again with the same arguments and ``resume=checkpoint``
        (``weights`` are still the task's starting weights). That sets ``rng`` to the paused
        run's generator state and gives a result identical to an uninterrupted run; a resumed
        call always runs at least one step. A checkpoint of another task, bundle, data size,
        batch size, epoch count or learning rate raises :class:`CheckpointMismatch`.
        """
        manifest = self.bundle.manifest
        check_tensors(manifest, weights, names=self._model_names)
        self.check_data(x, y)
        anchor = global_weights if global_weights is not None else weights
        context = StepContext(
            hyper=resolve_hyperparameters(manifest, hyperparameters),
            masks=mask_values(manifest, frozen),
            globals_={name: anchor[name] for g in manifest.graphs.values() for name in g.global_inputs},
            lr=np.array(lr, dtype=np.float32),
        )
        plan = TrainPlan(
            task_id=task_id,
            bundle_digest=self.bundle.digest,
            num_examples=len(x),
            batch_size=batch_size,
            epochs=epochs,
            lr=float(lr),
        )
        run = self._start(plan, weights, rng, context) if resume is None else self._resume(plan, resume, rng, context)
        self._run_steps(run, x, y, on_step, should_stop)
        progress = run.progress
        new_weights = {name: run.state[name] for name in self._model_names}
        scale = self.loss_scaler.scale if self.loss_scaler is not None else None
        mean_loss, accuracy = progress.loss_sum / max(progress.seen, 1), progress.correct_sum / max(progress.seen, 1)
        return TrainResult(new_weights, len(x), progress.steps, mean_loss, accuracy, progress.skipped, scale)

    def _start(self, plan: TrainPlan, weights: Tensors, rng: np.random.Generator, context: StepContext) -> TrainRun:
        state: Tensors = {name: np.array(weights[name]) for name in self._model_names}
        state.update(self.bundle.zero_optimizer_state())
        context.seed = int(rng.integers(0, 2**62))
        return TrainRun(plan=plan, state=state, context=context, rng=rng, progress=TrainProgress())

    def _resume(
        self, plan: TrainPlan, checkpoint: TrainCheckpoint, rng: np.random.Generator, context: StepContext
    ) -> TrainRun:
        check_resume(checkpoint, plan)
        if checkpoint.progress.steps >= total_steps(plan):
            raise CheckpointMismatch(f"checkpoint is past the task's last step ({checkpoint.progress.steps})")
        check_tensors(self.bundle.manifest, checkpoint.tensors, names=self._state_names)
        scaler = restore_scaler(self.loss_scaler, checkpoint)
        restore_rng(rng, checkpoint.rng_state)  # the last check: nothing has changed if it fails
        self.loss_scaler = scaler
        context.seed, context.forward_passes = checkpoint.seed, checkpoint.forward_passes
        state = {name: np.array(value) for name, value in checkpoint.tensors.items()}
        order = None if checkpoint.order is None else np.array(checkpoint.order)
        progress = replace(checkpoint.progress)
        return TrainRun(plan=plan, state=state, context=context, rng=rng, progress=progress, order=order)

    def _run_steps(
        self, run: TrainRun, x: np.ndarray, y: np.ndarray, on_step: StepCallback | None, should_stop: StopCheck | None
    ) -> None:
        total = total_steps(run.plan)
        progress = run.progress
        while progress.steps < total:
            batches = run.epoch_batches()
            for index in batches[progress.batch :]:
                self._train_batch(run, x, y, index)
                run.advance(len(batches))
                if on_step is not None:
                    on_step(progress.steps, total, progress.loss_sum / max(progress.seen, 1))
                if progress.steps < total and should_stop is not None and should_stop():
                    raise TrainingPaused(run.checkpoint(self.loss_scaler))

    def _train_batch(self, run: TrainRun, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        progress, context = run.progress, run.context
        context.step = progress.steps - progress.skipped + 1  # optimizer steps taken (Adam, schedules)
        outcome: tuple[float, int] | None
        if self.micro_batch and len(index) > self.micro_batch:
            outcome = self._accumulated_step(run.state, x, y, index, context)
        else:
            outcome = self._step(run.state, x[index], y[index], context)
        progress.steps += 1
        if outcome is None:
            progress.skipped += 1
        else:
            progress.loss_sum += outcome[0] * len(index)
            progress.correct_sum += outcome[1]
            progress.seen += len(index)

    def _step(self, state: Tensors, xb: np.ndarray, yb: np.ndarray, context: StepContext) -> tuple[float, int] | None:
        """One step; ``None`` when an fp16 step was skipped (state untouched)."""
        fixed = context.fixed(xb, yb)
        scaler = self.loss_scaler
        if scaler is not None:
            fixed[LOSS_SCALE_INPUT] = np.array(scaler.scale, dtype=np.float32)
        out, new_state, _ = self._runners().train.run(
            fixed, tensors=state, hyper=context.hyper, globals_=context.globals_, masks=context.masks
        )
        if scaler is not None:
            finite = bool(out[FINITE_OUTPUT])
            if scaler.is_exhausted(finite):
                raise TrainingError(
                    f"fp16 gradients overflow even at loss scale {scaler.scale:g} (loss {float(out['loss'])}); "
                    "the data or the forward pass overflows fp16: lower the learning rate or use an fp32 bundle"
                )
            self.loss_scaler = scaler.update(finite)
            if not finite:
                return None
        loss = _finite_loss(out["loss"])
        state.update(new_state)
        return loss, int(out["correct"])

    def _accumulated_step(
        self, state: Tensors, x: np.ndarray, y: np.ndarray, index: np.ndarray, context: StepContext
    ) -> tuple[float, int]:
        runners = self._runners()
        assert runners.accumulate is not None and runners.apply is not None
        parts = micro_slices(index, self.micro_batch)
        scales = accumulation_scales(self.bundle.manifest, y, parts, context.hyper)
        sums = {name: np.zeros_like(state[name]) for name in runners.accumulate.spec.accumulator_inputs}
        loss, correct = 0.0, 0
        for part, scale in zip(parts, scales, strict=True):
            fixed = context.fixed(x[part], y[part]) | {"scale": np.array(scale, dtype=np.float32)}
            accumulate = runners.accumulate
            out, new_buffers, sums = accumulate.run(fixed, tensors=state, hyper=context.hyper, accumulators=sums)
            loss += scale * _finite_loss(out["loss"])
            correct += int(out["correct"])
            state.update(new_buffers)
        _, new_state, _ = runners.apply.run(
            context.fixed(None, None),
            tensors=state,
            hyper=context.hyper,
            globals_=context.globals_,
            masks=context.masks,
            accumulators=sums,
        )
        state.update(new_state)
        return loss, correct

    def predict(self, weights: Tensors, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """Logits for ``x`` with the model in inference mode."""
        spec = self._infer_spec
        fixed = {spec.tensor_inputs[name]: weights[name] for name in spec.tensor_inputs}
        chunks = []
        for start in range(0, len(x), batch_size):
            feeds = dict(fixed)
            feeds[spec.inputs["x"]] = x[start : start + batch_size]
            try:
                chunks.append(self._runners().infer.run([spec.outputs["logits"]], feeds)[0])
            except Exception as exc:  # see _step
                raise TrainingError(f"inference failed in onnxruntime: {exc}") from exc
        return np.concatenate(chunks) if chunks else np.zeros((0, self.bundle.manifest.num_classes), np.float32)

    def evaluate(self, weights: Tensors, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Plain loss and accuracy of ``weights`` on ``(x, y)`` in inference mode.

        The loss is cross-entropy (classification), binary cross-entropy with logits (binary) or
        MSE (regression), whatever the training loss; accuracy is NaN where not defined.
        """
        check_tensors(self.bundle.manifest, weights, names=self._model_names)
        self.check_data(x, y)
        if len(x) == 0:
            return EvalResult(0, float("nan"), float("nan"))
        logits = self.predict(weights, x).astype(np.float64)
        task = self.bundle.manifest.task
        if task == "regression":
            return EvalResult(len(x), float(((logits - y) ** 2).mean()), float("nan"))
        if task == "binary":
            target = y.astype(np.float64)
            bce = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
            hits = ((logits > 0) == (target > 0.5)).reshape(len(x), -1).all(axis=1)
            return EvalResult(len(x), float(bce.mean()), float(hits.mean()))
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(len(x), loss, accuracy)

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Raise :class:`TrainingError` unless ``(x, y)`` fits the model's input and label spec."""
        manifest = self.bundle.manifest
        expected = tuple(manifest.input.shape[1:])
        if x.dtype != np.dtype(manifest.input.dtype) or tuple(x.shape[1:]) != expected:
            raise TrainingError(
                f"data x is {x.dtype}{list(x.shape)}, model expects "
                f"{manifest.input.dtype}[N, {', '.join(map(str, expected))}]"
            )
        label = manifest.label
        label_shape = (len(x), *(int(d) for d in label.shape[1:] if d is not None))
        if y.dtype != np.dtype(label.dtype) or y.shape != label_shape:
            raise TrainingError(
                f"labels y are {y.dtype}{list(y.shape)}, model expects {label.dtype}{list(label_shape)}"
                f" ({manifest.task})"
            )
        if manifest.task == "classification" and len(y) and (y.min() < 0 or y.max() >= manifest.num_classes):
            raise TrainingError(f"labels must be in [0, {manifest.num_classes}); got {y.min()}..{y.max()}")


def _finite_loss(value: np.ndarray) -> float:
    loss = float(value)
    if not np.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss}; lower the learning rate")
    return loss
