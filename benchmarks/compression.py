"""Update codecs on a federated digits run: bytes per update and final accuracy, vs fp32, one script run.

Digits (scikit-learn's bundled copy), split over ``--devices`` (50) with Dirichlet(``--alpha`` = 0.3),
the demo CNN (``--model cnn``) or a 50,826-value MLP (``--model mlp``), FedAvg for ``--rounds``
rounds with ``--per-round`` devices sampled per round — the same sample sequence, data and initial
weights for every codec. Each device is a real
:class:`~edge_agent.agent.Agent` (its ``execute`` path: onnxruntime training, codec choice,
error feedback) and the server side is the real :class:`~broker_server.rounds.RoundState`
(validation and streaming accumulation of the encoded payload); only the MQTT hop is left out,
so bytes are the UPDATE envelope a device would publish.

Prints a markdown table: payload and envelope bytes per update, ratio to fp32 (payload and
envelope), final test accuracy and its difference to fp32. Goals (issue #4): int8 >= 3.9x,
4-bit >= 7.5x, top-k 1 % + int8 with error feedback >= 50x, each within 1 accuracy point — met by
``--model mlp --rounds 400 --seeds 0 1 2`` (docs/benchmarks.md, ~12 min on 2 CPUs).

    python benchmarks/compression.py [--rounds 40] [--seeds 0 1 2] [--codecs fp32 int8 int4 topk-int8:0.01 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_server.aggregate import apply_delta
from broker_server.rounds import RoundState
from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import CodecSpec
from edge_agent.data import Dataset
from edge_agent.protocol.messages import TaskMessage, UpdateMessage, encode_message
from edge_agent.protocol.tensors import encode_tensors
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from fedflock.datasets import dirichlet_partition, load_digits_arrays, train_test_split

DEFAULT_CODECS = ["fp32", "fp16", "int8", "int8-channel", "int4", "int2", "sign", "topk:0.01", "topk-int8:0.01"]


def export_digits_bundle(out: Path, model: str = "cnn") -> Bundle:
    """The demo CNN (6,282 aggregated values) or a 64-256-128-10 MLP (50,826 values)."""
    import torch
    from torch import nn

    from model_export import DigitsCNN, export_bundle

    torch.manual_seed(0)
    if model == "cnn":
        net: nn.Module = DigitsCNN()
    else:
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    return Bundle.open(export_bundle(net, input_shape=(1, 8, 8), num_classes=10, out_dir=out, lr=0.05))


def run_codec(
    codec: str, bundle: Bundle, shards: list[Dataset], test: Dataset, args: argparse.Namespace
) -> dict[str, float]:
    spec = CodecSpec.parse(codec)
    trainer = OrtTrainer.open(bundle, threads=1)
    hub = InMemoryBroker()
    agents = [
        Agent(
            AgentConfig(device_id=f"d{i}", seed=i, codec_preferences={"unknown": (codec,)}),
            InMemoryTransport(hub, f"d{i}"),  # never started: execute() does no I/O
            trainer,
            shard,
        )
        for i, shard in enumerate(shards)
    ]
    weights = bundle.initial_weights()
    specs = bundle.manifest.aggregated_tensors
    sampler = np.random.default_rng(args.seed)
    payload_bytes: list[int] = []
    envelope_bytes: list[int] = []
    started = time.perf_counter()
    for number in range(1, args.rounds + 1):
        chosen = sorted(sampler.choice(len(agents), size=args.per_round, replace=False).tolist())
        tasks = {f"r{number}-d{i}": f"d{i}" for i in chosen}
        state = RoundState(
            round=number, model_version=number - 1, tasks=tasks, specs=specs, codecs=frozenset({spec.name})
        )
        shared = {t.name: weights[t.name] for t in bundle.manifest.shared_model_tensors}
        for task_id, device_id in tasks.items():
            task = TaskMessage(
                device_id=device_id,
                round=number,
                task_id=task_id,
                model_version=number - 1,
                bundle_digest=bundle.digest,
                epochs=args.epochs,
                batch_size=16,
                lr=0.05,
                deadline_s=60.0,
                weights=shared,
                codecs=(codec,),
            )
            update = agents[int(device_id[1:])].execute(task)
            assert isinstance(update, UpdateMessage), update
            payload_bytes.append(len(update.payload))
            envelope_bytes.append(len(encode_message(update)))
            state.accept_update(update)
        weights = apply_delta(weights, state.mean.result())
    accuracy = trainer.evaluate(weights, test.x, test.y).accuracy
    return {
        "payload": statistics.mean(payload_bytes),
        "envelope": statistics.mean(envelope_bytes),
        "accuracy": accuracy,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; accuracy averaged")
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn", help="the demo CNN or a 50k-value MLP")
    args = parser.parse_args()
    if "fp32" not in args.codecs:
        args.codecs.insert(0, "fp32")

    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_digits_bundle(Path(tmp) / "bundle", args.model)
        raw = len(encode_tensors({t.name: np.zeros(t.shape, np.float32) for t in bundle.manifest.aggregated_tensors}))
        params = sum(int(np.prod(t.shape)) for t in bundle.manifest.aggregated_tensors)
        runs: dict[str, list[dict[str, float]]] = {codec: [] for codec in args.codecs}
        for seed in args.seeds:
            shards, test = digits_shards(args, seed)
            for codec in args.codecs:
                r = run_codec(codec, bundle, shards, test, argparse.Namespace(**vars(args), seed=seed))
                runs[codec].append(r)
                print(
                    f"seed {seed} {codec}: {r['payload']:.0f} B payload, accuracy {r['accuracy']:.4f} "
                    f"({r['seconds']:.0f}s)",
                    flush=True,
                )
    print_table(runs, args, params, raw)


def digits_shards(args: argparse.Namespace, seed: int) -> tuple[list[Dataset], Dataset]:
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    train, test_idx = train_test_split(y, 0.2, rng)
    parts = dirichlet_partition(y[train], args.devices, args.alpha, rng)
    return [Dataset(x[train][p], y[train][p]) for p in parts], Dataset(x[test_idx], y[test_idx])


def print_table(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace, params: int, raw: int) -> None:
    def mean(codec: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[codec])

    seeds = ", ".join(map(str, args.seeds))
    print(
        f"\nDigits {args.model.upper()} ({params} aggregated parameters; plain fp32 tensor set {raw} B), "
        f"{args.devices} devices, "
        f"Dirichlet {args.alpha}, {args.per_round}/round, {args.rounds} rounds, {args.epochs} local epochs, "
        f"seeds {seeds} (accuracy: mean over seeds; Δ: mean of per-seed differences, [min, max])\n"
    )
    print("| codec | payload B | envelope B | payload ratio | envelope ratio | accuracy | Δ vs fp32 (points) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for codec in runs:
        deltas = [(r["accuracy"] - b["accuracy"]) * 100 for r, b in zip(runs[codec], runs["fp32"], strict=True)]
        spread = f" [{min(deltas):+.2f}, {max(deltas):+.2f}]" if len(deltas) > 1 else ""
        print(
            f"| {codec} | {mean(codec, 'payload'):.0f} | {mean(codec, 'envelope'):.0f} "
            f"| {mean('fp32', 'payload') / mean(codec, 'payload'):.2f}× "
            f"| {mean('fp32', 'envelope') / mean(codec, 'envelope'):.2f}× | {mean(codec, 'accuracy') * 100:.2f} % "
            f"| {statistics.mean(deltas):+.2f}{spread} |"
        )


if __name__ == "__main__":
    main()
