"""Pausing training at a step boundary and resuming it: bit-for-bit equal to an uninterrupted run.

Real bundles, real onnxruntime. 150 examples in batches of 32 give 5 steps per epoch
(32, 32, 32, 32, 22) and 3 epochs 15 steps: steps 5 and 10 end an epoch, step 7 is inside one.
Every resume gets a differently seeded generator (resume must restore the paused one's state).
Micro-batching is not covered: the digits bundle has no accumulate/apply graphs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.errors import FedflockError
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.checkpoint import (
    CheckpointMismatch,
    TrainCheckpoint,
    TrainingPaused,
    load_checkpoint,
    save_checkpoint,
)
from edge_agent.runtime.loss_scale import DynamicLossScaler, LossScaleConfig
from edge_agent.runtime.trainer import OrtTrainer, TrainResult
from fedflock.datasets import load_digits_arrays
from model_export import export_bundle

SEED, TASK = 7, "task-42"
EPOCHS, BATCH, LR = 3, 32, 0.05
STEPS_PER_EPOCH, TOTAL = 5, 15
Data = tuple[np.ndarray, np.ndarray]


@dataclass
class Pauser:
    """``should_stop`` that says True after the given steps (step numbers of the whole task)."""

    pause_after: set[int]
    done: int = 0
    asked: list[int] = field(default_factory=list)

    def on_step(self, done: int, total: int, loss: float) -> None:
        assert total == TOTAL
        self.done = done

    def __call__(self) -> bool:
        self.asked.append(self.done)
        return self.done in self.pause_after


@dataclass
class Outcome:
    result: TrainResult
    rng_after: np.ndarray
    checkpoints: list[TrainCheckpoint]
    asked: list[int]
    scaler: DynamicLossScaler | None


def train_once(trainer: OrtTrainer, data: Data, **overrides: Any) -> TrainResult:
    """One ``train`` call of the task (``overrides`` replace its keyword arguments)."""
    arguments: dict[str, Any] = {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "task_id": TASK} | overrides
    return trainer.train(trainer.bundle.initial_weights(), *data, **arguments)


def run_task(
    trainer: OrtTrainer,
    data: Data,
    pause_after: Iterable[int] = (),
    *,
    via_disk: Path | None = None,
    fresh: bool = False,
) -> Outcome:
    """Train to the end, pausing after ``pause_after`` and resuming each time.

    ``via_disk`` saves and loads every checkpoint; ``fresh`` opens a new trainer for every resume
    (a restarted process).
    """
    pauser = Pauser(set(pause_after))
    checkpoints: list[TrainCheckpoint] = []
    rng = np.random.default_rng(SEED)
    resume: TrainCheckpoint | None = None
    while True:
        try:
            result = train_once(trainer, data, rng=rng, on_step=pauser.on_step, should_stop=pauser, resume=resume)
            return Outcome(result, rng.random(4), checkpoints, pauser.asked, trainer.loss_scaler)
        except TrainingPaused as paused:
            checkpoints.append(paused.checkpoint)
            resume = paused.checkpoint
            if via_disk is not None:
                save_checkpoint(via_disk, resume)
                resume = load_checkpoint(via_disk)
            if fresh:
                trainer = OrtTrainer.open(trainer.bundle, loss_scaler=_initial_scaler(trainer))
            rng = np.random.default_rng(SEED + 1000 + len(checkpoints))


def _initial_scaler(trainer: OrtTrainer) -> DynamicLossScaler | None:
    return None if trainer.loss_scaler is None else DynamicLossScaler.initial(trainer.loss_scaler.config)


def assert_identical(got: Outcome, want: Outcome) -> None:
    assert got.result.weights.keys() == want.result.weights.keys()
    for name, value in want.result.weights.items():
        assert np.array_equal(got.result.weights[name], value), name
    assert (got.result.loss, got.result.accuracy, got.result.steps, got.result.num_examples) == (
        want.result.loss,
        want.result.accuracy,
        want.result.steps,
        want.result.num_examples,
    )
    assert (got.result.skipped_steps, got.result.loss_scale) == (want.result.skipped_steps, want.result.loss_scale)
    assert np.array_equal(got.rng_after, want.rng_after)  # rng is where an uninterrupted run leaves it


@pytest.fixture(scope="module")
def data() -> Data:
    x, y = load_digits_arrays()
    return x[:150], y[:150]


@pytest.fixture(scope="module")
def trainer(digits_bundle: Bundle) -> OrtTrainer:
    return OrtTrainer.open(digits_bundle)


@pytest.fixture(scope="module")
def baseline(trainer: OrtTrainer, data: Data) -> Outcome:
    return run_task(trainer, data)


@pytest.fixture(scope="module")
def mid_epoch(trainer: OrtTrainer, data: Data) -> TrainCheckpoint:
    with pytest.raises(TrainingPaused) as paused:
        train_once(trainer, data, rng=np.random.default_rng(SEED), should_stop=lambda: True)
    return paused.value.checkpoint


def test_uninterrupted_run_is_repeatable_and_depends_on_the_seed(
    trainer: OrtTrainer, data: Data, baseline: Outcome
) -> None:
    assert baseline.result.steps == TOTAL
    assert baseline.asked == list(range(1, TOTAL))  # every step boundary, never after the last step
    assert not np.array_equal(baseline.result.weights["fc.weight"], trainer.bundle.initial_weights()["fc.weight"])
    assert_identical(run_task(trainer, data), baseline)
    other = train_once(trainer, data, rng=np.random.default_rng(SEED + 1))
    assert not np.array_equal(other.weights["fc.weight"], baseline.result.weights["fc.weight"])


@pytest.mark.parametrize(
    "pause_after",
    [[1], [7], [5], [5, 10], [4, 5, 6], list(range(1, TOTAL))],
    ids=["after-step-1", "mid-epoch", "epoch-boundary", "two-epoch-boundaries", "three-in-a-row", "every-step"],
)
def test_resumed_run_equals_uninterrupted_run(
    trainer: OrtTrainer, data: Data, baseline: Outcome, pause_after: list[int]
) -> None:
    outcome = run_task(trainer, data, pause_after)
    assert_identical(outcome, baseline)
    assert [c.progress.steps for c in outcome.checkpoints] == pause_after
    for checkpoint in outcome.checkpoints:
        step = checkpoint.progress.steps
        assert (checkpoint.progress.epoch, checkpoint.progress.batch) == divmod(step, STEPS_PER_EPOCH)
        # at an epoch boundary the next permutation is not drawn yet
        assert (checkpoint.order is None) == (step % STEPS_PER_EPOCH == 0)


@pytest.mark.parametrize("pause_after", [[3, 5, 11], list(range(1, TOTAL))], ids=["three", "every-step"])
def test_resume_from_disk_in_a_new_trainer_equals_uninterrupted_run(
    trainer: OrtTrainer, data: Data, baseline: Outcome, pause_after: list[int], tmp_path: Path
) -> None:
    outcome = run_task(trainer, data, pause_after, via_disk=tmp_path / "task.ckpt", fresh=True)
    assert_identical(outcome, baseline)
    assert len(outcome.checkpoints) == len(pause_after)


def test_a_checkpoint_resumes_the_same_way_twice(
    trainer: OrtTrainer, data: Data, baseline: Outcome, mid_epoch: TrainCheckpoint
) -> None:
    for _ in range(2):
        result = train_once(trainer, data, rng=np.random.default_rng(0), resume=mid_epoch)
        assert all(np.array_equal(result.weights[n], w) for n, w in baseline.result.weights.items())
    assert mid_epoch.progress.steps == 1  # resuming did not advance the checkpoint itself


def test_paused_error_is_a_fedflock_error_with_a_stable_code(mid_epoch: TrainCheckpoint) -> None:
    error = TrainingPaused(mid_epoch)
    assert isinstance(error, FedflockError) and error.code == "training_paused"
    assert "task-42" in error.reason and "after step 1" in error.reason
    assert mid_epoch.plan.bundle_digest and mid_epoch.plan.task_id == TASK


@pytest.mark.parametrize(
    ("overrides", "size", "field_name"),
    [
        ({"task_id": "task-43"}, 150, "task_id"),
        ({"batch_size": 16}, 150, "batch_size"),
        ({"epochs": 4}, 150, "epochs"),
        ({"lr": 0.1}, 150, "lr"),
        ({}, 149, "num_examples"),
    ],
)
def test_resume_of_another_task_is_refused(
    trainer: OrtTrainer, data: Data, mid_epoch: TrainCheckpoint, overrides: dict[str, Any], size: int, field_name: str
) -> None:
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    with pytest.raises(CheckpointMismatch, match=field_name):
        train_once(trainer, (data[0][:size], data[1][:size]), rng=rng, resume=mid_epoch, **overrides)
    assert rng.bit_generator.state == before


def test_resume_with_another_bundle_or_generator_kind_is_refused(
    trainer: OrtTrainer, data: Data, mid_epoch: TrainCheckpoint
) -> None:
    other_bundle = replace(mid_epoch, plan=replace(mid_epoch.plan, bundle_digest="0" * 64))
    with pytest.raises(CheckpointMismatch, match="bundle_digest"):
        train_once(trainer, data, rng=np.random.default_rng(0), resume=other_bundle)
    with pytest.raises(CheckpointMismatch, match="PCG64"):
        train_once(trainer, data, rng=np.random.Generator(np.random.MT19937(0)), resume=mid_epoch)


# --- fp16: the dynamic loss scaler's state is part of the checkpoint ---------------------------


@pytest.fixture(scope="module")
def fp16_trainer(tmp_path_factory: pytest.TempPathFactory) -> OrtTrainer:
    """A tiny fp16 MLP with dropout (export ~4 s): its masks depend on the task seed and the
    forward passes run so far. A 2**24 initial scale overflows fp16 gradients, so the run skips
    steps and backs off; growth every 2 finite steps makes the scale move up again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 10))
    out = tmp_path_factory.mktemp("fp16-mlp")
    bundle = Bundle.open(
        export_bundle(model, input_shape=(1, 8, 8), num_classes=10, out_dir=out, lr=LR, precision="fp16")
    )
    return OrtTrainer.open(
        bundle, loss_scaler=DynamicLossScaler.initial(LossScaleConfig(init_scale=2.0**24, growth_interval=2))
    )


def test_fp16_resume_restores_the_loss_scaler(fp16_trainer: OrtTrainer, data: Data, tmp_path: Path) -> None:
    initial = _initial_scaler(fp16_trainer)
    fp16_trainer.loss_scaler = initial
    baseline = run_task(fp16_trainer, data)
    assert baseline.result.skipped_steps > 0  # the scaler really changed during the task
    fp16_trainer.loss_scaler = initial
    paused = run_task(fp16_trainer, data, [1, 5, 7, 9, 10], via_disk=tmp_path / "fp16.ckpt", fresh=True)
    assert_identical(paused, baseline)
    # measured: overflows back the scale off from 2**24 to 2**18 by step 6, then growth and overflow
    # alternate; the pauses land on skipped steps, mid-growth (tracker 1), after growth and backoff
    assert len({c.loss_scale for c in paused.checkpoints}) >= 3
    assert {c.growth_tracker for c in paused.checkpoints} == {0, 1}
    assert paused.checkpoints[-1].progress.skipped > paused.checkpoints[0].progress.skipped > 0
    assert paused.scaler is not None and baseline.scaler is not None
    assert (paused.scaler.scale, paused.scaler.growth_tracker) == (
        baseline.scaler.scale,
        baseline.scaler.growth_tracker,
    )
