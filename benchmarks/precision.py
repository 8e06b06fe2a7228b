"""FP16 mixed precision vs fp32: the digits CNN's exported train step in onnxruntime (CPU EP).

One script run exports both bundles (same initial weights), then for each batch size:

* **step ms**: median of ``--runs`` ``train_step`` runs after ``--warmup`` (2 intra-op threads,
  state fed back in as a device does; fp16 feeds ``loss_scale`` = 2**16);
* **peak RSS**: a fresh child process that imports only numpy + onnxruntime (what a device runs),
  opens the train session and runs ``--rss-steps`` steps; peak RSS (``VmHWM``) after opening the
  session and at the end, so the difference is what training adds. (Not ``ru_maxrss``: Linux
  carries it across ``execve``, so a child of this torch-importing process would report ~500 MiB.)
* graph facts: nodes and Cast nodes in the exported file, and in the graph onnxruntime actually
  runs (its optimized model, with the Casts it inserts around ops lacking fp16 kernels), and
  which dtype MatMul/Gemm compute in there.

Prints a markdown table.

    python benchmarks/precision.py [--batches 32 128] [--runs 200] [--warmup 20] [--rss-steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.runtime.bundle import Bundle  # noqa: E402
from model_export import DigitsCNN, export_bundle  # noqa: E402
from model_export.precision import LOSS_SCALE, precision_report  # noqa: E402

THREADS = 2
LR = 0.05

CHILD = r"""
import json, sys, numpy as np, onnxruntime as ort
def hwm():  # peak RSS of this process image in KiB (ru_maxrss would include the parent's, see below)
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
spec = json.loads(sys.argv[1])
options = ort.SessionOptions(); options.intra_op_num_threads = spec["threads"]; options.inter_op_num_threads = 1
session = ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
state = {k: np.load(v) for k, v in spec["state"].items()}
after_load = hwm()
rng = np.random.default_rng(0)
x = rng.random((spec["batch"], 1, 8, 8), dtype=np.float32); y = rng.integers(0, 10, spec["batch"])
fixed = {k: np.array(v, dtype=np.float32) for k, v in spec["scalars"].items()}
fixed |= {k: np.array(v, dtype=np.int64) for k, v in spec["int_scalars"].items()}
outputs = [spec["outputs"][k] for k in spec["state"]]
for _ in range(spec["steps"]):
    result = session.run(outputs, {"x": x, "y": y, **fixed, **{spec["inputs"][k]: v for k, v in state.items()}})
    state = dict(zip(spec["state"], result))
print(json.dumps([after_load, hwm()]))
"""


def _feeds_spec(bundle: Bundle) -> tuple[dict[str, float], dict[str, int]]:
    """Scalar inputs of the train step besides x/y/tensors, with the values a device would feed."""
    graph = bundle.manifest.graphs["train_step"]
    values = {"lr": LR, "step": 1.0, LOSS_SCALE: 2.0**16}
    floats = {graph.inputs[k]: v for k, v in values.items() if k in graph.inputs}
    for h in bundle.manifest.hyperparameters:
        if h.name in graph.hyper_inputs and not h.shape:
            floats[graph.hyper_inputs[h.name]] = h.default[0]
    ints = {graph.inputs["seed"]: 0} if "seed" in graph.inputs else {}
    return floats, ints


def time_step(bundle: Bundle, batch: int, warmup: int, runs: int) -> float:
    session = bundle.session("train_step", threads=THREADS)
    graph = bundle.manifest.graphs["train_step"]
    state = bundle.initial_weights() | bundle.zero_optimizer_state()
    floats, ints = _feeds_spec(bundle)
    fixed: dict[str, np.ndarray] = {k: np.array(v, np.float32) for k, v in floats.items()}
    fixed |= {k: np.array(v, np.int64) for k, v in ints.items()}
    rng = np.random.default_rng(0)
    fixed["x"] = rng.random((batch, 1, 8, 8), dtype=np.float32)
    fixed["y"] = rng.integers(0, 10, batch)
    names = list(state)
    outputs = [graph.tensor_outputs[n] for n in names]
    times = []
    for i in range(warmup + runs):
        feeds = fixed | {graph.tensor_inputs[n]: state[n] for n in names}
        start = time.perf_counter()
        result = session.run(outputs, feeds)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        state = dict(zip(names, result, strict=True))
    return statistics.median(times) * 1e3


def peak_rss(bundle: Bundle, batch: int, steps: int, tmp: Path) -> tuple[float, float]:
    graph = bundle.manifest.graphs["train_step"]
    state_files = {}
    for name, value in (bundle.initial_weights() | bundle.zero_optimizer_state()).items():
        path = tmp / f"{len(state_files)}.npy"
        np.save(path, value)
        state_files[name] = str(path)
    floats, ints = _feeds_spec(bundle)
    spec = {
        "path": str(bundle.directory / graph.file),
        "threads": THREADS,
        "batch": batch,
        "steps": steps,
        "state": state_files,
        "inputs": graph.tensor_inputs,
        "outputs": graph.tensor_outputs,
        "scalars": floats,
        "int_scalars": ints,
    }
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
    loaded, peak = json.loads(out.stdout)
    return loaded / 1024, peak / 1024  # VmHWM is in KiB


def graph_facts(bundle: Bundle, tmp: Path) -> dict[str, object]:
    path = bundle.directory / bundle.manifest.graphs["train_step"].file
    exported = precision_report(path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / f"{bundle.manifest.precision}-optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runtime = precision_report(options.optimized_model_filepath)
    return {
        "file_kib": path.stat().st_size / 1024,
        "nodes": exported.nodes,
        "casts": sum(exported.casts_to.values()),
        "compute": exported.compute_dtypes,
        "ort_nodes": runtime.nodes,
        "ort_casts": sum(runtime.casts_to.values()),
        "ort_compute": runtime.compute_dtypes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rss-steps", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundles = {}
        for precision in ("fp32", "fp16"):
            torch.manual_seed(0)
            path = export_bundle(
                DigitsCNN(), input_shape=(1, 8, 8), num_classes=10, out_dir=tmp / precision, lr=LR, precision=precision
            )
            bundles[precision] = Bundle.open(path)
        print(f"onnxruntime {ort.__version__}, {THREADS} threads, DigitsCNN, SGD momentum 0.9\n")
        print(
            "| precision | exported nodes | Casts | MatMul/Gemm/Conv dtypes "
            "| nodes ORT runs | Casts ORT runs | ORT compute dtypes | file KiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for precision, bundle in bundles.items():
            f = graph_facts(bundle, tmp)
            print(
                f"| {precision} | {f['nodes']} | {f['casts']} | {_dtypes(f['compute'])} | {f['ort_nodes']} | "
                f"{f['ort_casts']} | {_dtypes(f['ort_compute'])} | {f['file_kib']:.0f} |"
            )
        print()
        print(
            "| batch | fp32 step ms | fp16 step ms | fp16/fp32 "
            "| fp32 RSS MiB (session → peak) | fp16 RSS MiB (session → peak) |"
        )
        print("|---|---|---|---|---|---|")
        for batch in args.batches:
            ms = {p: time_step(b, batch, args.warmup, args.runs) for p, b in bundles.items()}
            rss = {p: peak_rss(b, batch, args.rss_steps, tmp) for p, b in bundles.items()}
            print(
                f"| {batch} | {ms['fp32']:.2f} | {ms['fp16']:.2f} | {ms['fp16'] / ms['fp32']:.2f}x | "
                f"{rss['fp32'][0]:.1f} → {rss['fp32'][1]:.1f} | {rss['fp16'][0]:.1f} → {rss['fp16'][1]:.1f} |"
            )


def _dtypes(compute: object) -> str:
    assert isinstance(compute, dict)
    return ", ".join(f"{op}:{dtype}×{n}" for (op, dtype), n in sorted(compute.items())) or "-"


if __name__ == "__main__":
    main()
