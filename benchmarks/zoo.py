"""Every parity-zoo model: onnxruntime train step vs PyTorch eager, time and peak RSS, fp32 and fp16.

One script run, 2 threads everywhere. For each zoo model and batch size:

* **step time** — median per-step time of a training loop over the same batches: PyTorch eager
  (``zero_grad`` + forward + cross-entropy + backward + ``SGD.step``, momentum 0.9) vs the device's
  real loop (``OrtTrainer.train``), for the fp32 and the fp16 bundle;
* **peak RSS** — each side trains in its own fresh process (PyTorch: imports torch + the model;
  onnxruntime: imports only the agent runtime), sampled every 5 ms with psutil.

Prints a markdown table with ratios to PyTorch (the issue's goals: time ≤ 0.8×, RSS ≤ 0.35×).

    python benchmarks/zoo.py [--models cnn_bn mlp ...] [--batches 32 128] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rss import RssSampler  # noqa: E402

THREADS = 2
LR, MOMENTUM = 0.05, 0.9

# Runs in a child process: train `steps` steps on random data, either side. argv: side bundle/entry ...
CHILD = r"""
import json, sys, time
import numpy as np
side, entry_name, bundle, batch, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
spec = json.loads(sys.argv[6])
rng = np.random.default_rng(0)
shape = (batch * steps, *spec["input_shape"])
if spec["input_dtype"] == "int64":
    x = rng.integers(1, spec["vocab"], shape, dtype=np.int64)
else:
    x = rng.standard_normal(shape, dtype=np.float32)
y = rng.integers(0, spec["num_classes"], batch * steps, dtype=np.int64)
if side == "torch":
    import torch
    from model_export.zoo import zoo_entry
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = zoo_entry(entry_name).factory().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[i*batch:(i+1)*batch]), yt[i*batch:(i+1)*batch]).backward()
        opt.step()
else:
    from edge_agent.runtime.bundle import Bundle
    from edge_agent.runtime.trainer import OrtTrainer
    b = Bundle.open(bundle)
    trainer = OrtTrainer.open(b, threads=2)
    trainer.train(b.initial_weights(), x, y, epochs=1, batch_size=batch, lr=0.05, rng=rng)
print("ok")
"""


@dataclass
class Row:
    model: str
    batch: int
    torch_ms: float
    fp32_ms: float
    fp16_ms: float | None
    torch_rss: int
    fp32_rss: int
    fp16_rss: int | None


def example(entry: object, model: object, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from model_export.zoo import ZooEntry

    assert isinstance(entry, ZooEntry)
    shape = (batch, *entry.input_shape)
    if entry.input_dtype == "int64":
        x = rng.integers(1, vocab_size(model), shape, dtype=np.int64)
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
    return x, rng.integers(0, entry.num_classes, batch, dtype=np.int64)


def vocab_size(model: object) -> int:
    import torch

    assert isinstance(model, torch.nn.Module)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return int(embeddings[0].num_embeddings) if embeddings else 2


def time_torch(model: object, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    import torch

    assert isinstance(model, torch.nn.Module)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for i in range(len(x) // batch):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            model(xt[i * batch : (i + 1) * batch]), yt[i * batch : (i + 1) * batch]
        ).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def time_ort(bundle: Path, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    from edge_agent.runtime.bundle import Bundle
    from edge_agent.runtime.trainer import OrtTrainer

    opened = Bundle.open(bundle)
    trainer = OrtTrainer.open(opened, threads=THREADS)
    weights = opened.initial_weights()
    rng = np.random.default_rng(0)
    trainer.train(weights, x[: 3 * batch], y[: 3 * batch], epochs=1, batch_size=batch, lr=LR, rng=rng)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.train(weights, x, y, epochs=1, batch_size=batch, lr=LR, rng=rng)
        times.append((time.perf_counter() - start) / (len(x) // batch))
    return min(times) * 1e3


def peak_rss(side: str, entry: object, bundle: Path | None, batch: int, steps: int, spec: dict[str, object]) -> int:
    from model_export.zoo import ZooEntry

    assert isinstance(entry, ZooEntry)
    cmd = [sys.executable, "-c", CHILD, side, entry.name, str(bundle or ""), str(batch), str(steps), json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = RssSampler(proc.pid).start()
    _, err = proc.communicate(timeout=600)
    peak = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{side} child for {entry.name} failed:\n{err.decode()[-2000:]}")
    return peak


def bench_model(name: str, batches: list[int], steps: int, work: Path) -> list[Row]:
    import torch

    from model_export.exporter import export_bundle
    from model_export.zoo import zoo_entry

    entry = zoo_entry(name)
    torch.manual_seed(0)
    model = entry.factory()
    bundles: dict[str, Path | None] = {}
    for precision in ("fp32", "fp16"):
        try:
            bundles[precision] = export_bundle(
                model,
                input_shape=entry.input_shape,
                input_dtype=entry.input_dtype,
                num_classes=entry.num_classes,
                out_dir=work / f"{name}-{precision}",
                precision=precision,
                lr=LR,
                momentum=MOMENTUM,
            )
        except Exception as exc:
            print(f"  {name} {precision}: export failed: {exc}", file=sys.stderr)
            bundles[precision] = None
    spec = {
        "input_shape": list(entry.input_shape),
        "input_dtype": entry.input_dtype,
        "num_classes": entry.num_classes,
        "vocab": vocab_size(model),
    }
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        x, y = example(entry, model, batch * steps, rng)
        torch.manual_seed(0)
        torch_ms = time_torch(entry.factory(), x, y, batch)
        fp32, fp16 = bundles["fp32"], bundles["fp16"]
        assert fp32 is not None, f"{name}: fp32 export failed"
        rows.append(
            Row(
                model=name,
                batch=batch,
                torch_ms=torch_ms,
                fp32_ms=time_ort(fp32, x, y, batch),
                fp16_ms=time_ort(fp16, x, y, batch) if fp16 else None,
                torch_rss=peak_rss("torch", entry, None, batch, steps, spec),
                fp32_rss=peak_rss("ort", entry, fp32, batch, steps, spec),
                fp16_rss=peak_rss("ort", entry, fp16, batch, steps, spec) if fp16 else None,
            )
        )
        print(f"  {name} batch {batch}: done", file=sys.stderr)
    return rows


def ratio(value: float | None, base: float) -> str:
    return "-" if value is None else f"{value / base:.2f}"


def main() -> None:
    from model_export.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[e.name for e in ZOO])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.batches, args.steps, Path(tmp))
    mib = 2**20
    print(
        f"{THREADS} threads, SGD momentum {MOMENTUM}, cross-entropy; time: median ms/step of a training loop; "
        "RSS: peak of a separate training process\n"
    )
    print(
        "| model | batch | PyTorch ms | ORT fp32 ms | fp32/PT | ORT fp16 ms | fp16/PT "
        "| PyTorch RSS MiB | ORT fp32 RSS | fp32/PT | ORT fp16 RSS | fp16/PT |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fp16_ms = "-" if r.fp16_ms is None else f"{r.fp16_ms:.2f}"
        fp16_rss = "-" if r.fp16_rss is None else f"{r.fp16_rss / mib:.0f}"
        print(
            f"| {r.model} | {r.batch} | {r.torch_ms:.2f} | {r.fp32_ms:.2f} | {ratio(r.fp32_ms, r.torch_ms)} "
            f"| {fp16_ms} | {ratio(r.fp16_ms, r.torch_ms)} | {r.torch_rss / mib:.0f} | {r.fp32_rss / mib:.0f} "
            f"| {ratio(r.fp32_rss, r.torch_rss)} | {fp16_rss} | {ratio(r.fp16_rss, r.torch_rss)} |"
        )


if __name__ == "__main__":
    main()
