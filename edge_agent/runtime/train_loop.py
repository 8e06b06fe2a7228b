"""The training loop's resumable state: batching, per-task step context, position and sums.

:class:`TrainRun` is what :meth:`OrtTrainer.train <edge_agent.runtime.trainer.OrtTrainer.train>`
threads from step to step; :meth:`TrainRun.checkpoint` freezes it into a
:class:`~edge_agent.runtime.checkpoint.TrainCheckpoint` at a step boundary. The permutation of an
epoch is drawn when its first step runs, so a pause at an epoch boundary has drawn nothing yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edge_agent.runtime.bundle import Tensors
from edge_agent.runtime.checkpoint import TrainCheckpoint, TrainPlan, TrainProgress
from edge_agent.runtime.loss_scale import DynamicLossScaler


def batch_slices(n: int, batch_size: int, order: np.ndarray) -> list[np.ndarray]:
    """Index batches over ``order``; a final batch of 1 is folded into the previous one.

    BatchNorm in training mode cannot normalise a single example, so no batch has size 1
    unless the whole data set does.
    """
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()  # (popping inside the assignment would shift the target index)
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


@dataclass
class StepContext:
    """What stays fixed during one task's training, plus the step counter and seed base."""

    hyper: Tensors
    masks: Tensors
    globals_: Tensors
    lr: np.ndarray
    step: int = 1
    seed: int = 0
    forward_passes: int = 0

    def fixed(self, xb: np.ndarray | None, yb: np.ndarray | None) -> dict[str, np.ndarray]:
        """Fixed inputs for one graph run; every forward pass gets its own seed."""
        self.forward_passes += 1
        values = {
            "lr": self.lr,
            "step": np.array(self.step, dtype=np.float32),
            "seed": np.array((self.seed + self.forward_passes) % 2**63, dtype=np.int64),
        }
        if xb is not None and yb is not None:
            values |= {"x": xb, "y": yb}
        return values


@dataclass
class TrainRun:
    """One training call's mutable loop state: tensors, position, sums and the epoch's order."""

    plan: TrainPlan
    state: Tensors
    context: StepContext
    rng: np.random.Generator
    progress: TrainProgress
    order: np.ndarray | None = None

    def epoch_batches(self) -> list[np.ndarray]:
        """The current epoch's batches; its permutation is drawn when the epoch starts."""
        if self.order is None:
            self.order = self.rng.permutation(self.plan.num_examples)
        return batch_slices(self.plan.num_examples, self.plan.batch_size, self.order)

    def advance(self, batches_in_epoch: int) -> None:
        self.progress.batch += 1
        if self.progress.batch == batches_in_epoch:
            self.progress.epoch, self.progress.batch, self.order = self.progress.epoch + 1, 0, None

    def checkpoint(self, scaler: DynamicLossScaler | None) -> TrainCheckpoint:
        return TrainCheckpoint(
            plan=self.plan,
            progress=replace(self.progress),
            tensors=dict(self.state),
            order=self.order,
            rng_state=self.rng.bit_generator.state,
            seed=self.context.seed,
            forward_passes=self.context.forward_passes,
            loss_scale=None if scaler is None else scaler.scale,
            growth_tracker=0 if scaler is None else scaler.growth_tracker,
        )


def total_steps(plan: TrainPlan) -> int:
    n = plan.num_examples
    return plan.epochs * len(batch_slices(n, plan.batch_size, np.arange(n)))
