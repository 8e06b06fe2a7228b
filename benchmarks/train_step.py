"""One SGD train step of DigitsCNN: PyTorch eager vs the exported onnxruntime train_step graph.

Both sides use 2 threads and the same batch; each timing is the median of ``--runs`` steps after
``--warmup`` steps. The ORT side feeds the returned state back in (as a device would), the
PyTorch side runs ``zero_grad`` + forward + backward + ``SGD.step``.

A third column times what a device actually runs: ``OrtTrainer.train`` for one epoch over
``--steps`` batches (shuffling, batch gathering, state threading, loss checks included), reported
per step as the median over ``--epochs`` such epochs. Prints a markdown table.

    python benchmarks/train_step.py [--batches 32 128] [--runs 200] [--warmup 20] [--steps 25] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.protocol.manifest import Manifest, load_manifest
from edge_agent.protocol.tensors import read_tensor_file
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from model_export import DigitsCNN, export_bundle

THREADS = 2
LR = 0.05
MOMENTUM = 0.9


def _median_ms(step: object, warmup: int, runs: int) -> float:
    assert callable(step)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_torch(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, warmup: int, runs: int) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        optimizer.step()

    return _median_ms(step, warmup, runs)


def time_ort(bundle: Path, manifest: Manifest, x: np.ndarray, y: np.ndarray, warmup: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(bundle / "train_step.onnx"), options, providers=["CPUExecutionProvider"])
    graph = manifest.graphs["train_step"]
    state = read_tensor_file(bundle / manifest.weights_file)
    for spec in manifest.tensors_with_role("optimizer_state"):
        state[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
    names = list(graph.tensor_inputs)
    fixed = {"x": x, "y": y, "lr": np.array(LR, dtype=np.float32)}
    output_names = [graph.tensor_outputs[n] for n in names]

    def step() -> None:
        feeds = fixed | {graph.tensor_inputs[n]: state[n] for n in names}
        for name, value in zip(names, session.run(output_names, feeds), strict=True):
            state[name] = value

    return _median_ms(step, warmup, runs)


def time_trainer(bundle: Path, batch: int, steps: int, epochs: int) -> float:
    """Per-step milliseconds of ``OrtTrainer.train`` (one epoch of ``steps`` batches), median of ``epochs``."""
    opened = Bundle.open(bundle)
    trainer = OrtTrainer.open(opened, threads=THREADS)
    weights = opened.initial_weights()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch * steps, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, batch * steps, dtype=np.int64)
    trainer.train(weights, x, y, epochs=1, batch_size=batch, lr=LR, rng=rng)  # warm-up
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.train(weights, x, y, epochs=1, batch_size=batch, lr=LR, rng=rng)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25, help="batches per OrtTrainer.train epoch")
    parser.add_argument("--epochs", type=int, default=15, help="timed OrtTrainer.train epochs")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = DigitsCNN()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        bundle = export_bundle(model, input_shape=(1, 8, 8), num_classes=10, out_dir=tmp, lr=LR, momentum=MOMENTUM)
        export_s = time.perf_counter() - started
        manifest, _ = load_manifest(bundle)
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batches:
            x = rng.standard_normal((batch, 1, 8, 8), dtype=np.float32)
            y = rng.integers(0, 10, batch, dtype=np.int64)
            torch_ms = time_torch(DigitsCNN(), x, y, args.warmup, args.runs)
            ort_ms = time_ort(bundle, manifest, x, y, args.warmup, args.runs)
            trainer_ms = time_trainer(bundle, batch, args.steps, args.epochs)
            rows.append((batch, torch_ms, ort_ms, trainer_ms))

    print(f"DigitsCNN train step (SGD momentum {MOMENTUM}), {THREADS} threads, median of {args.runs} runs")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}; export took {export_s:.1f} s\n")
    print(f"OrtTrainer.train: per step, one epoch of {args.steps} batches, median of {args.epochs} epochs\n")
    columns = ["batch", "PyTorch eager (ms)", "ORT session (ms)", "session / PyTorch"]
    columns += ["OrtTrainer.train (ms/step)", "trainer / PyTorch"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 1) + ":" for c in columns) + "|")
    for batch, torch_ms, ort_ms, trainer_ms in rows:
        print(
            f"| {batch} | {torch_ms:.3f} | {ort_ms:.3f} | {ort_ms / torch_ms:.2f} "
            f"| {trainer_ms:.3f} | {trainer_ms / torch_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
