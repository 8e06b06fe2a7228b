"""Central DP's accuracy cost on digits at ε = 1, 3, 8 (δ = 1e-5) vs no DP, one script run.

Every configuration uses the same devices, sampled device sequence, data and initial weights;
devices are real :class:`~edge_agent.agent.Agent` s (onnxruntime training, fp32 UPDATE payloads)
and the server side is the real :class:`~broker_server.rounds.RoundState` with a
:class:`~broker_server.privacy.DPMean` as its streaming mean (validation, clipping, the noisy
fixed-denominator mean from :class:`~broker_server.privacy.CentralDP`). Only the MQTT hop is left out.

Two fleets (``--fleets``):

* ``small``: the digits training set split over ``--devices`` (50) devices with Dirichlet(0.3),
  ``--per-round`` (10) per round — as benchmarks/compression.py;
* ``large``: ``--large-devices`` (2000) simulated devices, each holding ``--large-examples`` (24)
  examples drawn from the training set with a Dirichlet(0.3) class mix (devices overlap in data:
  it simulates a bigger fleet of the same distribution), ``--large-per-round`` (100) per round.

Rows per fleet: no DP (FedAvg weighted by examples, as the server does today), clipping only
(weight 1, fixed denominator, no noise: the cost of clipping alone), and central DP for each ε
with z calibrated so that ``--rounds`` rounds at q = per_round / devices spend exactly that ε.
The clip norm C is the median update norm of the first no-DP round (a public hyper-parameter,
tuned on the non-private run as DP papers do). BatchNorm running variances are clamped at 1e-3
after each noisy update (post-processing: costs no privacy; without it noise can make them < 0).

    python benchmarks/dp_digits.py [--rounds 30] [--epsilons 1 3 8] [--fleets small large] [--seed 0]
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

from benchmarks.compression import digits_shards, export_digits_bundle
from broker_server.aggregate import WeightedMean, apply_delta
from broker_server.privacy import CentralDP, CentralDPConfig, DPMean, clip_to_norm, update_norm
from broker_server.rounds import RoundState
from edge_agent.agent import Agent, AgentConfig
from edge_agent.codecs import decode_update
from edge_agent.data import Dataset
from edge_agent.protocol.messages import TaskMessage, UpdateMessage
from edge_agent.runtime.bundle import Bundle
from edge_agent.runtime.trainer import OrtTrainer
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport
from fedflock.datasets import load_digits_arrays, train_test_split

Tensors = dict[str, np.ndarray]
VAR_FLOOR = 1e-3


class Fleet:
    """Devices created on first use (a large fleet never trains most of them)."""

    def __init__(self, name: str, shards: list[Dataset], per_round: int, trainer: OrtTrainer) -> None:
        self.name, self.shards, self.per_round, self.trainer = name, shards, per_round, trainer
        self._hub = InMemoryBroker()

    @property
    def size(self) -> int:
        return len(self.shards)

    def agent(self, index: int) -> Agent:
        # a fresh Agent per task: fp32 has no error-feedback state, and memory stays flat
        config = AgentConfig(device_id=f"d{index}", seed=index, codec_preferences={"unknown": ("fp32",)})
        return Agent(config, InMemoryTransport(self._hub, f"d{index}"), self.trainer, self.shards[index])


def large_shards(x: np.ndarray, y: np.ndarray, devices: int, size: int, rng: np.random.Generator) -> list[Dataset]:
    by_class = [np.flatnonzero(y == label) for label in range(10)]
    shards = []
    for _ in range(devices):
        counts = rng.multinomial(size, rng.dirichlet(np.full(10, 0.3)))
        idx = np.concatenate([rng.choice(by_class[c], size=n, replace=True) for c, n in enumerate(counts) if n])
        shards.append(Dataset(x[idx], y[idx]))
    return shards


def clamp_variances(weights: Tensors) -> Tensors:
    return {n: np.maximum(v, VAR_FLOOR) if n.endswith("running_var") else v for n, v in weights.items()}


def run(
    bundle: Bundle, fleet: Fleet, test: Dataset, schedule: list[list[int]], mode: str, dp_config: CentralDPConfig | None
) -> dict[str, float]:
    """``mode``: "nodp" (weighted FedAvg), "clip" (clipping only) or "dp"."""
    specs = bundle.manifest.aggregated_tensors
    expected = {t.name: tuple(t.shape) for t in specs}
    weights = bundle.initial_weights()
    dp = CentralDP(dp_config, rng=np.random.default_rng(12345)) if mode == "dp" and dp_config is not None else None
    first_norms: list[float] = []
    clip_only = dp_config.clip_norm if mode == "clip" and dp_config is not None else None
    started = time.perf_counter()
    for number, chosen in enumerate(schedule, start=1):
        tasks = {f"r{number}-d{i}": f"d{i}" for i in chosen}
        mean: WeightedMean = DPMean(dp, specs) if dp is not None else WeightedMean()
        clipped_sum: Tensors = {t.name: np.zeros(t.shape) for t in specs}
        state = RoundState(round=number, model_version=number - 1, tasks=tasks, specs=specs, mean=mean)
        shared = {t.name: weights[t.name] for t in bundle.manifest.shared_model_tensors}
        for task_id, device_id in tasks.items():
            task = TaskMessage(
                device_id=device_id,
                round=number,
                task_id=task_id,
                model_version=number - 1,
                bundle_digest=bundle.digest,
                epochs=2,
                batch_size=16,
                lr=0.05,
                deadline_s=60.0,
                weights=shared,
                codecs=("fp32",),
            )
            update = fleet.agent(int(device_id[1:])).execute(task)
            assert isinstance(update, UpdateMessage), update
            if number == 1 and dp is None:
                first_norms.append(update_norm(decode_update(update.payload, expected)))
            state.accept_update(update)
            if clip_only is not None:
                clipped, _, _ = clip_to_norm(decode_update(update.payload, expected), clip_only)
                for name, value in clipped.items():
                    clipped_sum[name] += value
        if isinstance(mean, DPMean):
            delta = mean.release()
        elif clip_only is not None:  # weight 1, fixed denominator, no noise
            delta = {name: (value / fleet.per_round).astype(np.float32) for name, value in clipped_sum.items()}
        else:
            delta = mean.result()
        weights = clamp_variances(apply_delta(weights, delta))
    accuracy = trainer_accuracy(fleet.trainer, weights, test)
    result = {"accuracy": accuracy, "seconds": time.perf_counter() - started}
    if first_norms:
        result["median_norm"] = statistics.median(first_norms)
    if dp is not None:
        result.update(z=dp.noise_multiplier, epsilon=dp.spent().epsilon, clip=dp.config.clip_norm)
    return result


def trainer_accuracy(trainer: OrtTrainer, weights: Tensors, test: Dataset) -> float:
    return float(trainer.evaluate(weights, test.x, test.y).accuracy)


def dp_config(fleet: Fleet, clip: float, epsilon: float, rounds: int) -> CentralDPConfig:
    return CentralDPConfig(
        clip_norm=clip,
        epsilon=epsilon,
        delta=1e-5,
        clients_per_round=fleet.per_round,
        population=fleet.size,
        rounds=rounds,
    )


def bench_fleet(bundle: Bundle, fleet: Fleet, test: Dataset, args: argparse.Namespace) -> list[dict[str, object]]:
    sampler = np.random.default_rng(args.seed)
    schedule = [
        sorted(sampler.choice(fleet.size, size=fleet.per_round, replace=False).tolist()) for _ in range(args.rounds)
    ]
    rows: list[dict[str, object]] = []
    base = run(bundle, fleet, test, schedule, "nodp", None)
    clip = float(base["median_norm"])
    rows.append({"setting": "no DP (FedAvg)", **base})
    print(f"{fleet.name}: no DP {base['accuracy']:.4f} ({base['seconds']:.0f}s), C = {clip:.3f}", flush=True)
    configs: list[tuple[str, str, float]] = [("clipping only", "clip", 8.0)]
    configs += [(f"DP ε={eps:g}", "dp", eps) for eps in args.epsilons]
    for label, mode, eps in configs:
        r = run(bundle, fleet, test, schedule, mode, dp_config(fleet, clip, eps, args.rounds))
        rows.append({"setting": label, **r})
        print(f"{fleet.name}: {label} {r['accuracy']:.4f} ({r['seconds']:.0f}s)", flush=True)
    return rows


def print_table(fleet: Fleet, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    q = fleet.per_round / fleet.size
    print(
        f"\n{fleet.name} fleet: {fleet.size} devices, {fleet.per_round}/round (q = {q:.3g}), {args.rounds} rounds, "
        f"2 local epochs, δ = 1e-5, seed {args.seed}\n"
    )
    print("| setting | z | noise std on the mean / C | ε spent | accuracy | Δ vs no DP (points) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = float(rows[0]["accuracy"])  # type: ignore[arg-type]
    for row in rows:
        z = row.get("z")
        acc = float(row["accuracy"])  # type: ignore[arg-type]
        z_text = f"{z:.3f}" if isinstance(z, float) else "—"
        std = f"{z / fleet.per_round:.4f}" if isinstance(z, float) else "—"
        eps = f"{row['epsilon']:.3f}" if "epsilon" in row else "—"
        print(f"| {row['setting']} | {z_text} | {std} | {eps} | {acc * 100:.2f} % | {(acc - base) * 100:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--fleets", nargs="+", choices=["small", "large"], default=["small", "large"])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--large-devices", type=int, default=2000)
    parser.add_argument("--large-per-round", type=int, default=100)
    parser.add_argument("--large-examples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_digits_bundle(Path(tmp) / "bundle")
        trainer = OrtTrainer.open(bundle, threads=1)
        shards, test = digits_shards(argparse.Namespace(devices=args.devices, alpha=0.3), args.seed)
        tables = []
        for name in args.fleets:
            if name == "small":
                fleet = Fleet("small", shards, args.per_round, trainer)
            else:
                x, y = load_digits_arrays()
                rng = np.random.default_rng(args.seed)
                train, _ = train_test_split(y, 0.2, rng)  # the same split as digits_shards (same seed)
                fleet = Fleet(
                    "large",
                    large_shards(x[train], y[train], args.large_devices, args.large_examples, rng),
                    args.large_per_round,
                    trainer,
                )
            tables.append((fleet, bench_fleet(bundle, fleet, test, args)))
    for fleet, rows in tables:
        print_table(fleet, rows, args)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
