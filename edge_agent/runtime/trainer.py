"""On-device training and evaluation with plain onnxruntime.

The train-step graph is a pure function ``(x, y, lr, tensors) -> (loss, correct, new tensors)``;
this module feeds it mini-batches and threads the tensors from one step into the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edge_agent.errors import TrainingError
from edge_agent.runtime.bundle import Bundle, Tensors, check_tensors

#: Called after every step with (steps done, total steps, running mean loss).
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainResult:
    weights: Tensors
    num_examples: int
    steps: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


def batch_slices(n: int, batch_size: int, order: np.ndarray) -> list[np.ndarray]:
    """Index batches over ``order``; a final batch of 1 is folded into the previous one.

    BatchNorm in training mode cannot normalise a single example, so no batch has size 1
    unless the whole data set does.
    """
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


class OrtTrainer:
    """Trains and evaluates one bundle's model. Create with :meth:`open`."""

    def __init__(
        self, bundle: Bundle, train_session: ort.InferenceSession, inference_session: ort.InferenceSession
    ) -> None:
        self.bundle = bundle
        self._train = train_session
        self._infer = inference_session
        manifest = bundle.manifest
        self._train_spec = manifest.graphs["train_step"]
        self._infer_spec = manifest.graphs["inference"]
        self._model_names = [t.name for t in manifest.model_tensors]
        self._state_names = [t.name for t in manifest.tensors]
        self._output_names = [self._train_spec.outputs["loss"], self._train_spec.outputs["correct"]] + [
            self._train_spec.tensor_outputs[name] for name in self._state_names
        ]

    @classmethod
    def open(cls, bundle: Bundle, *, threads: int = 1) -> OrtTrainer:
        return cls(bundle, bundle.session("train_step", threads=threads), bundle.session("inference", threads=threads))

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
    ) -> TrainResult:
        """Run ``epochs`` passes of mini-batch SGD from ``weights``; optimizer state starts at zero."""
        check_tensors(self.bundle.manifest, weights, names=self._model_names)
        self.check_data(x, y)
        state: Tensors = {name: np.array(weights[name]) for name in self._model_names}
        state.update(self.bundle.zero_optimizer_state())
        lr_value = np.array(lr, dtype=np.float32)
        total_steps = epochs * len(batch_slices(len(x), batch_size, np.arange(len(x))))
        loss_sum, correct_sum, seen, steps = 0.0, 0, 0, 0
        for _ in range(epochs):
            for index in batch_slices(len(x), batch_size, rng.permutation(len(x))):
                loss, correct = self._step(state, x[index], y[index], lr_value)
                loss_sum += loss * len(index)
                correct_sum += correct
                seen += len(index)
                steps += 1
                if on_step is not None:
                    on_step(steps, total_steps, loss_sum / seen)
        new_weights = {name: state[name] for name in self._model_names}
        return TrainResult(new_weights, len(x), steps, loss_sum / max(seen, 1), correct_sum / max(seen, 1))

    def _step(self, state: Tensors, xb: np.ndarray, yb: np.ndarray, lr: np.ndarray) -> tuple[float, int]:
        spec = self._train_spec
        feeds = {spec.inputs["x"]: xb, spec.inputs["y"]: yb, spec.inputs["lr"]: lr}
        for name in self._state_names:
            feeds[spec.tensor_inputs[name]] = state[name]
        try:
            outputs = self._train.run(self._output_names, feeds)
        except Exception as exc:  # onnxruntime's errors are untyped; translate at the boundary
            raise TrainingError(f"train step failed in onnxruntime: {exc}") from exc
        loss = float(outputs[0])
        if not np.isfinite(loss):
            raise TrainingError(f"loss became {loss}; lower the learning rate")
        for name, value in zip(self._state_names, outputs[2:], strict=True):
            state[name] = value
        return loss, int(outputs[1])

    def predict(self, weights: Tensors, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """Logits for ``x`` with the model in inference mode."""
        spec = self._infer_spec
        fixed = {spec.tensor_inputs[name]: weights[name] for name in spec.tensor_inputs}
        chunks = []
        for start in range(0, len(x), batch_size):
            feeds = dict(fixed)
            feeds[spec.inputs["x"]] = x[start : start + batch_size]
            try:
                chunks.append(self._infer.run([spec.outputs["logits"]], feeds)[0])
            except Exception as exc:  # see _step
                raise TrainingError(f"inference failed in onnxruntime: {exc}") from exc
        return np.concatenate(chunks) if chunks else np.zeros((0, self.bundle.manifest.num_classes), np.float32)

    def evaluate(self, weights: Tensors, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean cross-entropy and accuracy of ``weights`` on ``(x, y)``."""
        check_tensors(self.bundle.manifest, weights, names=self._model_names)
        self.check_data(x, y)
        if len(x) == 0:
            return EvalResult(0, float("nan"), float("nan"))
        logits = self.predict(weights, x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(len(x), loss, accuracy)

    def check_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Raise :class:`TrainingError` unless ``(x, y)`` fits the model's input and label spec."""
        manifest = self.bundle.manifest
        expected = tuple(manifest.input.shape[1:])
        if x.dtype != np.float32 or tuple(x.shape[1:]) != expected:
            raise TrainingError(
                f"data x is {x.dtype}{list(x.shape)}, model expects float32[N, {', '.join(map(str, expected))}]"
            )
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise TrainingError(f"labels y are {y.dtype}{list(y.shape)}, model expects int64[{len(x)}]")
        if len(y) and (y.min() < 0 or y.max() >= manifest.num_classes):
            raise TrainingError(f"labels must be in [0, {manifest.num_classes}); got {y.min()}..{y.max()}")
